"""Optimizer state parked in files between steps (ZeRO-Infinity's ``offload_optimizer: nvme``).

DeepSpeed's own swapper moves only tensors shaped like its flat partitions (the fp32 master,
its gradient and ``optimizer.state[partition]``). Our per-matrix states (bases, factors,
rotated or factored moments) and our AdamW pieces are shaped otherwise, so this store keeps
them itself: between steps a state dict holds a :class:`Parked` reference in place of each
tensor; a step reads the states it computes into host buffers, the math runs, and every
tensor, new ones included, is written back and parked again. ``resident`` does that for one
call at once; ``state_stream`` pipelines it chunk by chunk (reads ahead, writes behind).

Each entry has two files, written in turn: a step call's writes go to the one that does not
hold the last good step, which stays intact until the whole call has finished (``commit``), so
a call that fails half-way (after some chunks were written behind) loses nothing of it. The
price is twice our state's bytes on the drive (the planner counts it).

I/O goes through an asynchronous handle with DeepSpeed's ``aio_handle`` interface
(``async_pread``/``async_pwrite``/``wait``; libaio with O_DIRECT); ``wait`` covers every
request in flight. O_DIRECT transfers whole aligned blocks and silently drops a shorter tail,
so buffers are padded to ``ALIGN_BYTES`` and every written file's size is checked.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, MutableMapping, Sequence

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
    """Parks state tensors in ``folder``: two files per state entry, written in turn, so that a
    step's writes never touch the files of the last good step until the step has finished."""

    def __init__(self, folder: str, io: Any, pin: bool = False) -> None:
        """``io``: an async I/O handle (DeepSpeed's ``aio_handle``); ``pin``: page-locked buffers
        (a CUDA machine: the host-to-GPU copies of the state stream then run asynchronously)."""
        shutil.rmtree(folder, ignore_errors=True)  # a previous run's files are not this run's state
        os.makedirs(folder, exist_ok=True)
        self.folder, self.io, self.pin = folder, io, pin
        self.bytes_read = self.bytes_written = 0
        self._submitted = 0                              # operations in flight on ``io``
        self._completions: list[Callable[[], None]] = []  # what to do once they are done
        self._committed: dict[str, int] = {}             # file stem -> slot of the last good step
        self._written: dict[str, int] = {}               # file stem -> slot written since the last commit

    # ----- a step call's view ---------------------------------------------------
    @contextmanager
    def resident(self, named: Named) -> Iterator[None]:
        """The states' tensors in host memory for the duration; written back and parked after.
        If the body (or a write) raises, every state is put back as it was before: its
        committed files still hold the last good step."""
        before = self.snapshot(named)
        try:
            self.load(named)
            yield
            self.park(named)
        except BaseException:
            self.abandon(named, before)
            raise

    @staticmethod
    def snapshot(named: Named) -> list[dict[str, Any]]:
        """Each state dict's entries (its :class:`Parked` references): what :meth:`abandon` restores."""
        return [dict(st) for _, st in named]

    def load(self, named: Named) -> None:
        """Read every parked tensor of these states (all reads in flight at once)."""
        self.begin_load(named)
        self.finish()

    def park(self, named: Named) -> None:
        """Write every state tensor (of one or more elements) to its file, replace it with a
        :class:`Parked` reference, and make these files the last good step."""
        self.begin_park(named)
        self.finish()
        self.commit()

    def begin_load(self, named: Named) -> None:
        """Submit the reads of these states' parked tensors; :meth:`finish` puts them in place."""
        todo = [(st, key, ref) for _, st in named for key, ref in st.items() if isinstance(ref, Parked)]
        buffers = [self._buffer(ref.numel, ref.dtype) for _, _, ref in todo]
        for (_, _, ref), buf in zip(todo, buffers):
            self._submit(self.io.async_pread(buf, ref.path, 0), ref.path)

        def done() -> None:
            for (st, key, ref), buf in zip(todo, buffers):
                st[key] = buf.narrow(0, 0, ref.numel).view(ref.shape)
                self.bytes_read += buf.numel() * buf.element_size()
        self._completions.append(done)

    def begin_park(self, named: Named) -> None:
        """Submit the writes of these states' tensors, each to the file that does not hold the
        last good step; :meth:`finish` checks them and parks the tensors. A tensor still in the
        buffer ``load`` gave it is written from there; others (new state, or a tensor the math
        replaced) through a padded host copy."""
        todo = []
        for name, st in named:
            for key, value in st.items():
                if isinstance(value, Tensor) and value.dim() > 0:
                    stem = self._stem(name, key)
                    slot = 1 - self._committed.get(stem, 1)
                    todo.append((st, key, value, stem, slot, self._padded(value)))
        for _, _, _, stem, slot, buf in todo:
            self._submit(self.io.async_pwrite(buf, self._path(stem, slot), 0), self._path(stem, slot))

        def done() -> None:
            for st, key, value, stem, slot, buf in todo:
                path = self._path(stem, slot)
                size = os.path.getsize(path)
                if size < buf.numel() * buf.element_size():  # O_DIRECT leaves out a misaligned tail silently
                    raise RuntimeError(f"ds_structopt: NVMe write of {path} stored {size} of "
                                       f"{buf.numel() * buf.element_size()} bytes")
                self.bytes_written += size
                self._written[stem] = slot
                st[key] = Parked(path, tuple(value.shape), value.dtype, self)
        self._completions.append(done)

    def finish(self) -> None:
        """Wait for every submitted read and write (one handle: its ``wait`` covers them all), then
        put what was read in place and park what was written."""
        expected, completions = self._submitted, self._completions
        self._submitted, self._completions = 0, []
        done = self.io.wait() if expected else 0
        if done != expected:
            raise RuntimeError(f"ds_structopt: NVMe I/O: {done} of {expected} operations completed")
        for complete in completions:
            complete()

    def commit(self) -> None:
        """The files written since the last commit now hold the last good step."""
        self._committed.update(self._written)
        self._written.clear()

    def abandon(self, named: Named, before: list[dict[str, Any]]) -> None:
        """A failed step: I/O in flight is waited for (its buffers must outlive it) and dropped,
        and every state dict is put back to ``before`` (references to the committed files)."""
        try:
            if self._submitted:
                self.io.wait()
        finally:
            self._completions.clear()  # after the wait: they hold the buffers the I/O used
            self._submitted = 0
            self._written.clear()
            for (_, st), old in zip(named, before):
                st.clear()
                st.update(old)

    def read(self, ref: Parked) -> Tensor:
        """One parked tensor, read into a new host tensor of its shape."""
        buf = self._buffer(ref.numel, ref.dtype)
        if self._submitted:
            raise RuntimeError("ds_structopt: NVMe read of a parked tensor while a step's I/O is in flight")
        self._submit(self.io.async_pread(buf, ref.path, 0), ref.path)
        self.finish()
        return buf.narrow(0, 0, ref.numel).view(ref.shape).clone()

    @staticmethod
    def parked_bytes(states: Sequence[State]) -> int:
        return sum(v.nbytes for st in states for v in st.values() if isinstance(v, Parked))

    # ----- files and buffers ----------------------------------------------------
    def _stem(self, name: str, key: str) -> str:
        return os.path.join(self.folder, re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}.{key}"))

    @staticmethod
    def _path(stem: str, slot: int) -> str:
        return f"{stem}.{slot}.bin"

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

    def _submit(self, status: int, path: str) -> None:
        if status != 0:
            raise RuntimeError(f"ds_structopt: could not submit NVMe I/O for {path} (status {status})")
        self._submitted += 1


def _padded_numel(numel: int, dtype: torch.dtype) -> int:
    """``numel`` rounded up to whole ``ALIGN_BYTES`` blocks."""
    per_block = max(1, ALIGN_BYTES // dtype.itemsize)
    return -(-numel // per_block) * per_block
