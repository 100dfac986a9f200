"""Where the small tensors we hand to collectives must live.

NCCL takes CUDA tensors only and gloo CPU ones, so a flag, a counter or a sum
of squares is created on this device, never with a bare ``torch.tensor(...)``
(which lands on the CPU and crashes an NCCL job at its first step).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


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
