"""Live tensor bytes of a simulated rank: what a GPU's caching allocator would have to hold.

Fake tensors have no memory, so ``torch.cuda.max_memory_allocated`` has nothing to say.
:class:`LiveBytes` is a dispatch mode that sees every tensor an op creates, keys it by its
storage (views share one) and counts the storage's bytes until the last Python tensor
using it is collected. ``peak`` is the high-water mark since :meth:`reset_peak`; storages
that only C++ holds (none in an optimizer step under ``no_grad``) are not seen.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Counts bytes of storages alive that were created while the mode was active."""

    def __init__(self, device_type: Optional[str] = None) -> None:
        """``device_type``: count only tensors on devices of that type ("cuda": GPU memory)."""
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage key -> [bytes, tensors alive]
        self._seen: set[int] = set()                # ids of tensor objects already counted

    def reset_peak(self) -> int:
        """Start a new high-water mark from what is alive now; returns it."""
        self.peak = self.live
        return self.live

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage (tensors made before the mode, e.g. parameters handed in)."""
        if id(t) in self._seen:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [storage.nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        self._seen.add(id(t))
        weakref.finalize(t, self._release, key, id(t))

    def _release(self, key: int, tensor_id: int) -> None:
        self._seen.discard(tensor_id)
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and self.device_type in (None, t.device.type):
                self.track(t)
        return out
