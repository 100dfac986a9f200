"""An owner's offloaded state streamed through its math chunk by chunk (ZeRO-Offload, ZeRO-Infinity).

Under ``offload_optimizer`` our per-matrix states live with DeepSpeed's partitions: in host
memory (``"cpu"``) or in files (``"nvme"``, :class:`~.state_store.StateStore`), while the owner's
math runs on the GPU. A step call's matrices are cut into chunks of about
``offload_stream_mib`` of state (``chunk_indices``), and while chunk k computes:

- chunk k+1's states are read from NVMe (all reads in flight) and copied to the GPU on a copy
  stream of ours;
- chunk k-1's states are copied back to host memory on that stream (after k-1's math); their
  NVMe writes are submitted once chunk k+1's upload is queued, and run beside chunk k+1's math
  (one aio handle: its ``wait`` covers every request, so a write submitted earlier would
  hold up the next upload).

So about three chunks of state are on the GPU (and in host buffers under NVMe) at once, not the
whole call's, and transfers run beside the math instead of before and after it. The copy
stream's queue is ordered so that chunk k+1's upload is queued before chunk k's download,
which waits for chunk k's math: uploads never wait for the math. Device copies are dropped only
after the host has seen their download finish, so the caching allocator never hands out
memory a copy may still read.

Without a GPU (DeepSpeed's CPU accelerator) the states are used in place and only the NVMe
reads and writes are pipelined: chunk k+1's reads and chunk k-1's writes are in flight while
chunk k computes.

A failure in a chunk leaves the files of the call's last good step intact (``StateStore.abandon``:
nothing this call wrote is committed, every state dict gets its references back). In host
memory, the chunks on the GPU get their host tensors back; chunks already computed keep their
new state, as without offload. Rollback is per call: calls of the same step that finished
before keep what they committed.
"""
from __future__ import annotations

from typing import Any, Callable, MutableMapping, Optional, Sequence

import torch
from torch import Tensor

from ..optim.cuda_streams import StreamPerDevice
from .state_store import StateStore

State = MutableMapping[str, Any]
Named = list[tuple[str, State]]


def chunk_indices(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive indices cut so that each chunk's ``sizes`` add up to at most ``limit``
    (a larger item is a chunk of its own)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if current and total + size > limit:
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        chunks.append(current)
    return chunks


class StateStream:
    """Runs a step call's math chunk by chunk with the states moved in and out beside it. One copy
    stream per GPU, made once (:class:`~..optim.cuda_streams.StreamPerDevice`)."""

    def __init__(self) -> None:
        self._streams = StreamPerDevice()
        self.chunks_streamed = 0  # chunks run through ``run`` (metrics, tests)

    def run(self, named: Named, chunks: list[list[int]], device: torch.device, home: Optional[torch.device],
            store: Optional[StateStore], compute: Callable[[list[int]], None]) -> None:
        """``compute(chunk)`` for each chunk (indices into ``named``) with that chunk's states on
        ``device``; afterwards every state is back on ``home`` (None: where it is) and, with a
        ``store``, parked in its files."""
        staging = home is not None and torch.device(home) != torch.device(device)
        parts = [[named[i] for i in chunk] for chunk in chunks]
        before = store.snapshot(named) if store is not None else []
        copy = self._streams.for_device(device) if staging else None
        inbound: list[Optional[tuple[list[dict[str, Tensor]], Any]]] = [None] * len(parts)
        outbound: Optional[tuple[Any, list[Tensor]]] = None
        try:
            if store is not None:
                store.load(parts[0])
            if staging:
                inbound[0] = _to_device(parts[0], device, copy)
            for k, part in enumerate(parts):
                if store is not None and k + 1 < len(parts):
                    store.begin_load(parts[k + 1])  # read while chunk k computes
                if staging:
                    torch.cuda.current_stream(device).wait_event(inbound[k][1])
                compute(chunks[k])
                self.chunks_streamed += 1
                downloaded = None
                if outbound is not None:  # chunk k-1's download ran beside chunk k's math
                    _settle(outbound)
                    outbound, downloaded = None, parts[k - 1]
                if store is not None:
                    store.finish()  # chunk k+1's reads (and the writes submitted before) are done
                if staging:
                    if k + 1 < len(parts):  # queued before chunk k's download, which waits for k's math
                        inbound[k + 1] = _to_device(parts[k + 1], device, copy)
                    if store is not None and downloaded is not None:
                        store.begin_park(downloaded)  # written while chunk k+1 uploads and computes
                    outbound = _to_home(part, inbound[k][0], device, home, copy)
                    inbound[k] = None
                elif store is not None:
                    store.begin_park(part)  # written while chunk k+1 computes
            if outbound is not None:
                _settle(outbound)
                outbound = None
                if store is not None:
                    store.begin_park(parts[-1])
            if store is not None:
                store.finish()
                store.commit()
        except BaseException:
            try:
                if copy is not None:  # no copy in flight into the host tensors handed back below
                    copy.synchronize()
                for k, sent in enumerate(inbound):  # chunks on the GPU: their host tensors are the last good step
                    if sent is not None:
                        for (_, st), host in zip(parts[k], sent[0]):
                            st.update(host)
            finally:
                if store is not None:
                    store.abandon(named, before)
            raise


def _to_device(part: Named, device: torch.device, copy: Any) -> tuple[list[dict[str, Tensor]], Any]:
    """Queue the chunk's host tensors' uploads on ``copy`` (the device copies are made on that
    stream); returns the host tensors, kept to write back into, and the event the math waits for."""
    kept = []
    math_stream = torch.cuda.current_stream(device)
    with torch.cuda.stream(copy):
        for _, st in part:
            host = {k: v for k, v in st.items() if isinstance(v, Tensor) and v.device != torch.device(device)}
            for k, v in host.items():
                st[k] = v.to(device, non_blocking=True)
                # made on the copy stream, read by the math: a copy the math replaces and drops is
                # not reused before the math's kernels queued by then have run
                st[k].record_stream(math_stream)
            kept.append(host)
        event = torch.cuda.Event()
        event.record(copy)
    return kept, event


def _to_home(part: Named, kept: list[dict[str, Tensor]], device: torch.device, home: torch.device,
             copy: Any) -> tuple[Any, list[Tensor]]:
    """Queue the chunk's downloads on ``copy`` after its math: into the host tensors it came
    from (they stay the state), or new pinned ones for new state. Returns the event and the
    device tensors, kept alive until the host has seen the event."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    copy.wait_event(done)
    on_device = []
    with torch.cuda.stream(copy):
        for (_, st), host in zip(part, kept):
            for k, v in list(st.items()):
                if not isinstance(v, Tensor) or v.device == torch.device(home):
                    continue
                old = host.get(k)
                # a host tensor that is not page-locked (new state, or one a checkpoint restored)
                # is replaced by one that is: a download into pageable memory blocks the host
                if old is None or old.shape != v.shape or old.dtype != v.dtype or not old.is_pinned():
                    old = torch.empty(v.shape, dtype=v.dtype, device=home).pin_memory()
                st[k] = old.copy_(v, non_blocking=True)
                on_device.append(v)
        event = torch.cuda.Event()
        event.record(copy)
    return event, on_device


def _settle(outbound: tuple[Any, list[Tensor]]) -> None:
    """Wait until a chunk's downloads are done; its device copies may be freed after."""
    event, on_device = outbound
    event.synchronize()
    on_device.clear()
