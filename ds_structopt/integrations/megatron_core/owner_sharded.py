"""Megatron's chained optimizer with every parameter owned by one data-parallel rank.

The layer-wise design (as megatron's own ``LayerWiseDistributedOptimizer``): megatron's
DDP all-reduces gradients as usual, each rank's optimizers hold only the
parameters it owns (so structured state, Adam moments and fp32 masters are
split across the DP group by whole parameters), and after the step each rank's
updated parameters are all-gathered. Ownership comes from our cost model, not
by numel; the all-gather pads every rank's flat buffer to one size, because
gloo's all_gather cannot take uneven sizes. Gradient statistics (norm for
clipping, inf/nan for loss scaling, zero counts) are reduced over the whole
world since each rank sees only its own parameters' gradients. With a loss scaler (fp16)
the chain has ONE scaler: megatron's wrappers each check their own parameters, the
flags are OR-ed and the scale is updated once per step, so every parameter is
unscaled by the scale its loss was multiplied by.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.optimizer.clip_grads import count_zeros_fp32, get_grad_norm_fp32
from megatron.core.optimizer.optimizer import ChainedOptimizer, MegatronOptimizer


class SharedScale:
    """What a megatron wrapper sees of the chain's one loss scaler: its scale, but no updates."""

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler

    @property
    def scale(self) -> torch.Tensor:
        return self.scaler.scale

    @property
    def inv_scale(self) -> torch.Tensor:
        return self.scaler.inv_scale

    def update(self, found_inf: bool) -> None:
        """The chain updates the real scaler once, with every wrapper's flag."""

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.scaler.load_state_dict(state_dict)


class OwnerShardedOptimizer(ChainedOptimizer):
    def __init__(self, optimizers: list[MegatronOptimizer], params_by_owner: list[list[torch.Tensor]],
                 dp_group: Optional[dist.ProcessGroup], grad_scaler: Any = None) -> None:
        for opt in optimizers:
            opt.grad_stats_parallel_group = None  # None = the whole world
        super().__init__(optimizers)
        self.params_by_owner = params_by_owner
        self.dp_group = dp_group
        self.grad_scaler = grad_scaler

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        found_inf = super().prepare_grads()
        if self.grad_scaler is not None:
            self.grad_scaler.update(found_inf)
        return found_inf

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        grads = [g for opt in self.chained_optimizers for g in opt.get_main_grads_for_grad_norm()]
        return get_grad_norm_fp32(grads, grad_stats_parallel_group=None)

    @torch.no_grad()
    def count_zeros(self) -> float:
        params = [p for opt in self.chained_optimizers for p in opt.get_parameters()]
        return count_zeros_fp32(params, grad_stats_parallel_group=None,
                                use_decoupled_grad=self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)

    @torch.no_grad()
    def step(self):  # type: ignore[override]
        ok, grad_norm, zeros = super().step()
        if ok:
            self.sync_params()
        return ok, grad_norm, zeros

    @torch.no_grad()
    def sync_params(self) -> None:
        """Every rank gets every owner's updated parameters (one padded all_gather per dtype)."""
        world = len(self.params_by_owner)
        if world == 1:
            return
        rank = dist.get_rank(self.dp_group)
        dtypes = sorted({p.dtype for params in self.params_by_owner for p in params}, key=str)
        for dtype in dtypes:
            lists = [[p for p in params if p.dtype == dtype] for params in self.params_by_owner]
            sizes = [sum(p.numel() for p in ps) for ps in lists]
            width = max(sizes)
            if width == 0:
                continue
            device = next(p.device for ps in lists for p in ps)
            mine = torch.zeros(width, dtype=dtype, device=device)
            offset = 0
            for p in lists[rank]:
                mine[offset:offset + p.numel()].copy_(p.reshape(-1))
                offset += p.numel()
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine, group=self.dp_group)
            for owner, (flat, params) in enumerate(zip(gathered, lists)):
                if owner == rank:
                    continue
                offset = 0
                for p in params:
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
