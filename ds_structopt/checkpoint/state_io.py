"""Small pieces every checkpoint writer here shares: copying optimizer state off and onto a
device, replacing a small text file atomically (markers like ``latest``, manifests, meta), and
the sha256 of a file (checkpoint and prepared-data manifests)."""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import torch


def map_tensors(fn: Callable[[torch.Tensor], Any], state: Any) -> Any:
    """``state`` with ``fn`` applied to every tensor, however deeply nested in dicts, lists and
    tuples (a parked refresh-ahead result is a dict holding a list of bases)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_tensors(fn, v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_tensors(fn, v) for v in state)
    return state


def cpu_copy(state: Any) -> Any:
    """A detached CPU copy of saved state (tensors copied, other values as they are)."""
    return map_tensors(lambda t: t.detach().cpu().clone(), state)


def to_device(state: Any, device: torch.device) -> Any:
    """Saved state with every tensor on ``device`` (nested ones too: left on the CPU they would
    meet the GPU moments in the next step's math)."""
    return map_tensors(lambda t: t.to(device), state)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary name, flush it to disk, then rename over ``path``."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def sha256_file(path: "str | os.PathLike[str]") -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
