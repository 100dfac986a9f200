"""Loading our checkpoint files without running code from them.

Our files hold tensors and plain containers only, so they are read with
``torch.load(weights_only=True)``; a file that carries anything else (a pickled
object whose loading would execute code) is refused with one line naming the
file, before any of it runs, instead of torch's multi-paragraph unpickler error.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Union

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects/code, not just tensors and plain containers."""


def safe_load(path: Union[str, os.PathLike], map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; refuses executable pickle payloads with one clear line.
    ``mmap``: tensors stay in the file until read (a reader of a part pays for that part)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      "not a tensors-only file")
        raise UnsafeCheckpointError(f"refusing to load {os.fspath(path)}: it holds pickled objects or code "
                                    f"({reason}); ds_structopt checkpoints contain tensors and plain containers only") from None
