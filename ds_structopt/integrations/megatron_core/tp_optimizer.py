"""The torch optimizer megatron's wrappers drive for this rank's matrices, tensor-parallel aware.

Megatron's FP32/Float16 wrappers hand it ``param.grad`` (from ``main_grad``) and
may swap its params for fp32 master copies, keeping their positions; so what each
position is (name, TP layout) is recorded at construction and the structured
optimizer itself is built on the first step over "work" tensors:

- ``tp_mode="gather"``: a split matrix's work tensor is the whole TP=1 matrix;
  each step all-gathers gradient and weights over the TP group, updates the whole
  matrix (state for the whole matrix on every TP rank of the owner) and keeps this
  rank's slice. Exact with respect to TP=1; costs two all-gathers per matrix.
- ``tp_mode="local"``: every shard is its own matrix (block-diagonal
  preconditioner, state 1/TP, no communication).

lr and weight decay come from megatron's param groups each step (its scheduler
sets them), everything else from ``options``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ...optim.base import StructuredOptimizer
from .tp_layout import ShardLayout

TP_MODES = ("gather", "local")


class TensorParallelStructured(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict[str, Any]], optimizer_cls: type[StructuredOptimizer],
                 options: dict[str, Any], names: Sequence[Sequence[str]],
                 layouts: Sequence[Sequence[Optional[ShardLayout]]], tp_group: Optional[dist.ProcessGroup],
                 tp_mode: str, lr: float, weight_decay: float) -> None:
        if tp_mode not in TP_MODES:
            raise ValueError(f"tp_mode '{tp_mode}' is not one of {list(TP_MODES)}")
        # megatron's groups carry lr/weight_decay only once its scheduler has run: start from the config's
        super().__init__(param_groups, {"lr": lr, "weight_decay": weight_decay})
        self.optimizer_cls = optimizer_cls
        self.options = dict(options)
        self.names = [list(n) for n in names]
        self.layouts = [list(lay) if tp_mode == "gather" else [None] * len(lay) for lay in layouts]
        self.tp_group = tp_group
        self.tp_mode = tp_mode
        self.inner: Optional[StructuredOptimizer] = None
        self._work: list[list[torch.Tensor]] = []

    # ----- the structured optimizer over work tensors ---------------------
    def _build_inner(self) -> StructuredOptimizer:
        groups = []
        self._work = []
        for group, layouts in zip(self.param_groups, self.layouts):
            work = []
            for p, layout in zip(group["params"], layouts):
                if layout is None:
                    work.append(p)
                else:
                    work.append(torch.zeros(layout.full_shape(p.shape), dtype=torch.float32, device=p.device))
            self._work.append(work)
            groups.append({"params": work, "lr": group["lr"], "weight_decay": group["weight_decay"]})
        return self.optimizer_cls(groups, **self.options)

    def work_items(self) -> list[tuple[str, torch.Tensor]]:
        """(name, work tensor) for every matrix this rank updates (checkpoints key state by these)."""
        if self.inner is None:
            self.inner = self._build_inner()
        return [(n, w) for names, work in zip(self.names, self._work) for n, w in zip(names, work)]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if self.inner is None:
            self.inner = self._build_inner()
        for group, inner_group, work, layouts in zip(self.param_groups, self.inner.param_groups, self._work, self.layouts):
            inner_group["lr"] = group["lr"]
            inner_group["weight_decay"] = group["weight_decay"]
            for p, w, layout in zip(group["params"], work, layouts):
                if layout is None:
                    continue
                if p.grad is None:
                    w.grad = None
                    continue
                w.grad = layout.gather(p.grad.float(), self.tp_group)
                w.copy_(layout.gather(p.detach().float(), self.tp_group))
        self.inner.step()
        for group, work, layouts in zip(self.param_groups, self._work, self.layouts):
            for p, w, layout in zip(group["params"], work, layouts):
                if layout is not None and w.grad is not None:
                    p.copy_(layout.local_view(w))
        return None

    def settle(self) -> None:
        if self.inner is not None:
            self.inner.settle()

    def stats(self) -> dict[str, int]:
        return self.inner.stats() if self.inner is not None else {}

    # ----- same-layout resume through torch's own state_dict ---------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.inner is not None:
            sd["ds_structopt_inner"] = self.inner.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        inner = state_dict.pop("ds_structopt_inner", None)
        super().load_state_dict(state_dict)
        if inner is not None:
            if self.inner is None:
                self.inner = self._build_inner()
            self.inner.load_state_dict(inner)
