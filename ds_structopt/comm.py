"""Where the small tensors we hand to collectives must live.

NCCL takes CUDA tensors only and gloo CPU ones, so a flag, a counter or a sum
of squares is created on this device, never with a bare ``torch.tensor(...)``
(which lands on the CPU and crashes an NCCL job at its first step).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def any_rank(flag: bool, near: Optional[torch.device] = None) -> bool:
    """True on every rank when it is true on any rank of the world (one 1-float all-reduce on
    ``comm_device(None, near)``: the engine's GPU under NCCL)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device(None, near))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return not bool((t == 0).item())  # read back as "no rank raised it"


def comm_device(group: Optional[dist.ProcessGroup] = None, near: Optional[torch.device] = None) -> torch.device:
    """The device for tensors sent through ``group``.

    ``near`` is where the data involved lives (a parameter, the engine's device): a CUDA
    device there wins, so each rank uses its own GPU. Otherwise a group whose backend
    needs CUDA (NCCL) gets the current CUDA device (e.g. ZeRO-Offload keeps partitions
    on the CPU), and everything else the CPU.
    """
    if near is not None and torch.device(near).type == "cuda":
        return torch.device(near)
    if dist.is_initialized() and "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
