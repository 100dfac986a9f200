"""Optimizer state parked in files between steps (ZeRO-Infinity's ``offload_optimizer: nvme``).

DeepSpeed's own swapper moves only tensors shaped like its flat partitions (the fp32 master,
its gradient and ``optimizer.state[partition]``). Our per-matrix states (bases, factors,
rotated or factored moments) and our AdamW pieces are shaped otherwise, so this store keeps
them itself: between steps a state dict holds a :class:`Parked` reference in place of each
tensor; a step call reads the states it computes into host buffers (``resident``), the math
runs (streamed to the GPU as under ZeRO-Offload to the CPU: ``optimizer.staged``), and every
tensor, new ones included, is written back and parked again.

I/O goes through an asynchronous handle with DeepSpeed's ``aio_handle`` interface
(``async_pread``/``async_pwrite``/``wait``; libaio with O_DIRECT): all reads of a call are in
flight together, then all writes. O_DIRECT transfers whole aligned blocks and silently drops a
shorter tail, so buffers are padded to ``ALIGN_BYTES`` and every written file's size is checked.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, MutableMapping, Sequence

import torch
from torch import Tensor

ALIGN_BYTES = 1024
State = MutableMapping[str, Any]
Named = Sequence[tuple[str, State]]  # (a state's unique name, the state dict)


@dataclass(frozen=True)
class Parked:
    """A state tensor kept in a file between steps: what its state dict holds meanwhile."""

    path: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    store: "StateStore" = field(repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def materialize(self) -> Tensor:
        """A host copy (a checkpoint writes one tensor at a time: the state is never all in memory)."""
        return self.store.read(self)


class StateStore:
    """Parks state tensors in ``folder`` (one file per state entry, rewritten in place each step)."""

    def __init__(self, folder: str, io: Any, pin: bool = False) -> None:
        """``io``: an async I/O handle (DeepSpeed's ``aio_handle``); ``pin``: page-locked buffers
        (a CUDA machine: the host-to-GPU copies of ``staged`` then run asynchronously)."""
        shutil.rmtree(folder, ignore_errors=True)  # a previous run's files are not this run's state
        os.makedirs(folder, exist_ok=True)
        self.folder, self.io, self.pin = folder, io, pin
        self.bytes_read = self.bytes_written = 0

    # ----- a step call's view ---------------------------------------------------
    @contextmanager
    def resident(self, named: Named) -> Iterator[None]:
        """The states' tensors in host memory for the duration; written back and parked after.
        If the body raises, nothing is written: every state is put back as it was before (its
        files still hold the last good step)."""
        before = [dict(st) for _, st in named]
        self.load(named)
        try:
            yield
        except BaseException:
            for (_, st), old in zip(named, before):
                st.clear()
                st.update(old)
            raise
        self.park(named)

    def load(self, named: Named) -> None:
        """Read every parked tensor of these states (all reads in flight at once)."""
        todo = [(st, key, ref) for _, st in named for key, ref in st.items() if isinstance(ref, Parked)]
        buffers = [self._buffer(ref.numel, ref.dtype) for _, _, ref in todo]
        for (_, _, ref), buf in zip(todo, buffers):
            self._submit(self.io.async_pread(buf, ref.path, 0), ref.path)
        self._wait(len(todo), "read")
        for (st, key, ref), buf in zip(todo, buffers):
            st[key] = buf.narrow(0, 0, ref.numel).view(ref.shape)
            self.bytes_read += buf.numel() * buf.element_size()

    def park(self, named: Named) -> None:
        """Write every state tensor (of one or more elements) to its file, then replace it with a
        :class:`Parked` reference. A tensor still in the buffer ``load`` gave it is written from
        there; others (new state, or a tensor the math replaced) through a padded copy."""
        todo = []
        for name, st in named:
            for key, value in st.items():
                if isinstance(value, Tensor) and value.dim() > 0:
                    todo.append((st, key, value, self._path(name, key), self._padded(value)))
        for _, _, _, path, buf in todo:
            self._submit(self.io.async_pwrite(buf, path, 0), path)
        self._wait(len(todo), "write")
        for st, key, value, path, buf in todo:
            size = os.path.getsize(path)
            if size < buf.numel() * buf.element_size():  # O_DIRECT leaves out a misaligned tail silently
                raise RuntimeError(f"ds_structopt: NVMe write of {path} stored {size} of "
                                   f"{buf.numel() * buf.element_size()} bytes")
            self.bytes_written += size
            st[key] = Parked(path, tuple(value.shape), value.dtype, self)

    def read(self, ref: Parked) -> Tensor:
        """One parked tensor, read into a new host tensor of its shape."""
        buf = self._buffer(ref.numel, ref.dtype)
        self._submit(self.io.async_pread(buf, ref.path, 0), ref.path)
        self._wait(1, "read")
        return buf.narrow(0, 0, ref.numel).view(ref.shape).clone()

    @staticmethod
    def parked_bytes(states: Sequence[State]) -> int:
        return sum(v.nbytes for st in states for v in st.values() if isinstance(v, Parked))

    # ----- files and buffers ----------------------------------------------------
    def _path(self, name: str, key: str) -> str:
        return os.path.join(self.folder, re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}.{key}") + ".bin")

    def _buffer(self, numel: int, dtype: torch.dtype) -> Tensor:
        buf = torch.empty(_padded_numel(numel, dtype), dtype=dtype)
        return buf.pin_memory() if self.pin else buf

    def _padded(self, value: Tensor) -> Tensor:
        """``value``'s own padded buffer when it is the front of one (as ``load`` made it), else a
        padded host copy (also of a GPU tensor)."""
        base = value._base if value._base is not None else value
        if (base.dim() == 1 and base.device.type == "cpu" and base.dtype == value.dtype and value.is_contiguous()
                and value.data_ptr() == base.data_ptr() and base.numel() == _padded_numel(value.numel(), value.dtype)):
            return base
        buf = self._buffer(value.numel(), value.dtype)
        buf.narrow(0, 0, value.numel()).copy_(value.reshape(-1))
        return buf

    @staticmethod
    def _submit(status: int, path: str) -> None:
        if status != 0:
            raise RuntimeError(f"ds_structopt: could not submit NVMe I/O for {path} (status {status})")

    def _wait(self, expected: int, what: str) -> None:
        done = self.io.wait() if expected else 0
        if done != expected:
            raise RuntimeError(f"ds_structopt: NVMe {what}: {done} of {expected} operations completed")


def _padded_numel(numel: int, dtype: torch.dtype) -> int:
    """``numel`` rounded up to whole ``ALIGN_BYTES`` blocks."""
    per_block = max(1, ALIGN_BYTES // dtype.itemsize)
    return -(-numel // per_block) * per_block
