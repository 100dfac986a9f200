"""Plain PyTorch data parallelism (DDP, FSDP2 ``fully_shard``) with our ownership partitioning.

No DeepSpeed: the same :class:`DistributedStructuredOptimizer` is built over the
model's own parameters. Under DDP every rank holds whole, averaged gradients,
so each matrix's owner computes its update and sends it to the other ranks;
under FSDP2 each rank holds dim-0 shards (DTensors), so owners gather the
shards' gradients and return update slices, exactly as with ZeRO-3.
Elementwise parameters run AdamW on whatever this rank holds.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from ..distributed.optimizer import DistributedStructuredOptimizer
from ..grouping import param_groups as default_groups
from ..optim.registry import get_optimizer_class


def distributed_optimizer(model: torch.nn.Module, optimizer: str = "AdaDiag++",
                          process_group: Optional[dist.ProcessGroup] = None, *,
                          param_groups: Optional[list[dict[str, Any]]] = None, ownership: str = "local",
                          ownership_group_size: Optional[int] = None, cost_model: str = "flops",
                          **options: Any) -> DistributedStructuredOptimizer:
    """Our optimizer for a DDP- or FSDP2-wrapped ``model`` (call after wrapping; every rank calls it).

    ``options`` are the optimizer's (``lr``, ``update_freq``, ...); ``param_groups`` defaults to
    ``ds_structopt.param_groups(model)``. Use it like any torch optimizer: ``loss.backward();
    opt.step(); opt.zero_grad()``; checkpoints through ``ds_structopt.checkpoint.save/load``.
    """
    if not dist.is_initialized():
        raise RuntimeError("distributed_optimizer needs an initialized process group (torch.distributed.init_process_group)")
    cls = get_optimizer_class(optimizer)
    groups = param_groups if param_groups is not None else default_groups(model)
    return DistributedStructuredOptimizer(groups, cls, options, cost_model=cost_model, process_group=process_group,
                                          ownership=ownership, ownership_group_size=ownership_group_size)
