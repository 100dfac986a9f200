"""Every random generator a training step draws from, saved per rank and restored on resume.

Dropout, data augmentation or any sampling in the model draws from Python's ``random``,
torch's CPU generator and the CUDA generator of this rank's device; ranks usually hold
different states. Each rank's states go to its own small file in the checkpoint, so a
resumed run draws exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import os
import random
from typing import Any

import torch

from ..checkpoint.safe_load import safe_load

SUBDIR = "rng"


def _path(folder: str, rank: int) -> str:
    return os.path.join(folder, SUBDIR, f"rank{rank:05d}.pt")


def capture(device: torch.device) -> dict[str, Any]:
    """This rank's generator states (tensors and plain containers: ``weights_only`` loadable)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save(folder: str, rank: int, device: torch.device) -> str:
    """Write this rank's file (flushed to disk); returns its path."""
    path = _path(folder, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        torch.save(capture(device), f)
        f.flush()
        os.fsync(f.fileno())
    return path


def restore(folder: str, rank: int, device: torch.device) -> bool:
    """Restore this rank's states; False when the checkpoint has none for this rank (written by
    fewer ranks or by an older release): the generators then stay as seeded."""
    path = _path(folder, rank)
    if not os.path.exists(path):
        return False
    state = safe_load(path)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    return True
