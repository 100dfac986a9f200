"""Small pieces every checkpoint writer here shares: copying optimizer state off and onto a
device, and replacing a small text file atomically (markers like ``latest``, manifests, meta)."""
from __future__ import annotations

import os
from typing import Any

import torch


def cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A detached CPU copy of one parameter's state (tensors copied, other values as they are)."""
    return {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def to_device(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One parameter's saved state with its tensors moved to ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary name, flush it to disk, then rename over ``path``."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
