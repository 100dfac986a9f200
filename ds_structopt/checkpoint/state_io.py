"""Small pieces every checkpoint writer here shares: copying optimizer state off and onto a
device, and replacing a small text file atomically (markers like ``latest``, manifests, meta)."""
from __future__ import annotations

import os
from typing import Any

import torch


def cpu_copy(state: Any) -> Any:
    """A detached CPU copy of saved state, however deeply nested (tensors copied, other values as they are)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return state


def to_device(state: Any, device: torch.device) -> Any:
    """Saved state with every tensor moved to ``device``, however deeply nested (a parked
    refresh-ahead result is a dict holding a list of bases: left on the CPU it would meet the
    GPU moments in the next step's math)."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: to_device(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_device(v, device) for v in state)
    return state


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary name, flush it to disk, then rename over ``path``."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
