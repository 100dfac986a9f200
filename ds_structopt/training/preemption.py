"""Stop at a step boundary, with a checkpoint, when the job is asked to stop.

Schedulers and launchers ask a job to end with a signal: SLURM sends SIGTERM on preemption,
``scancel`` and at the time limit (SIGKILL follows ``KillWait`` later, 30 s by default), and
``--signal=USR1@300`` sends SIGUSR1 ahead of the limit; the deepspeed launcher and torchrun
forward SIGTERM to the ranks and SIGKILL them 30 s later (launch/README.md has the details).

The handler only records which signal came: a Python handler runs between bytecodes of the
main thread, possibly inside DeepSpeed's step or a collective, where I/O or another collective
could deadlock or corrupt state. The training loop calls :func:`agree` once per optimizer step;
it all-reduces the flag so every rank stops at the same step, even when only one rank was
signalled (the deepspeed launcher signals its ranks one after the other; ``kill`` may reach
one process only), and the checkpoint written there is complete.
"""
from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Optional

import torch

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_received: int = 0  # the first signal number received, 0 for none


def _record(signum: int, frame: Optional[FrameType]) -> None:
    """Signal handler: remember the first signal, nothing else (no I/O, no collectives)."""
    global _received
    if not _received:
        _received = signum


def install(signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
    """Record ``signals`` instead of dying on them (main thread only, as Python requires).

    SIGINT is left alone: Ctrl-C still interrupts at once."""
    for sig in signals:
        signal.signal(sig, _record)


def received() -> Optional[str]:
    """This process's recorded signal (``"SIGTERM"``...), or None."""
    return signal.Signals(_received).name if _received else None


def reset() -> None:
    """Forget a recorded signal (tests; a run that handled its preemption)."""
    global _received
    _received = 0


def agree(device: Any) -> Optional[str]:
    """Collective: the signal's name on every rank if ANY rank received one, else None.

    One all-reduce (MAX) of a 1-element tensor on ``device`` (the engine's: under NCCL a CPU
    tensor in a collective fails), so every rank takes the same decision at the same step;
    with several signals the highest number wins. Without a process group: the local flag."""
    import torch.distributed as dist

    from ..comm import comm_device

    if not dist.is_initialized():
        return received()
    flag = torch.tensor([float(_received)], device=comm_device(None, device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    signum = int(flag.item())
    return signal.Signals(signum).name if signum else None
