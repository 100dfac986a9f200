"""When a matrix refreshes its basis: every T steps, optionally staggered by a per-matrix phase.

Refreshing every matrix at the same step makes that step several times slower
and stalls every rank. With ``stagger_refresh=True`` each matrix gets a phase
in [0, T) and refreshes whenever (t - 1) mod T == phase. Phases are chosen
longest-decomposition-first into the least-loaded of the T slots, so every step
carries about the same refresh work (on each owner rank, since only owners call
the math). The phase lives in the matrix's state, so it is checkpointed and a
resumed run keeps its schedule.

The first basis is spread too: all at t = 1 would be the one step that does every
decomposition at once (at 7B-70B shapes it can outlast the collective timeout).
With staggering, a matrix of phase p gets its first basis at t = 1 + (p mod W),
W = ``first_refresh_window`` (default min(T, 8), capped at T), i.e. within the
first W steps, each of them carrying about 1/W of the work. Until then the matrix
runs unrotated (AdaDiag: P = Q = identity, i.e. Adam; ASGO eigh: no root yet, the
update is the RMS-matched momentum). Without staggering every matrix gets its
first basis at t = 1, as in the papers.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, MutableMapping, Optional, Sequence

import torch

from .cuda_streams import StreamPerDevice
from .precision import full_fp32_matmul

#: Default ``first_refresh_window`` with staggering: at most this many steps to spread the first bases over.
FIRST_REFRESH_WINDOW = 8


def refresh_due(step: int, update_freq: int, phase: int = 0, first_window: int = 1) -> bool:
    """Is step ``step`` (1-based) a refresh step for a matrix with this phase?

    The first refresh is at 1 + (phase mod ``first_window``) (1: every matrix at step 1).
    """
    phase %= update_freq
    first = 1 + phase % max(1, min(first_window, update_freq))
    return step == first or (step > first and (step - 1) % update_freq == phase)


def first_refresh_window(group: Mapping[str, Any]) -> int:
    """Steps the first bases are spread over: ``first_refresh_window`` (None: min(T, 8)) with
    ``stagger_refresh``, capped at ``update_freq``; 1 (everything at step 1) without."""
    if not group.get("stagger_refresh", False):
        return 1
    window = group.get("first_refresh_window")
    return min(group["update_freq"], FIRST_REFRESH_WINDOW if window is None else window)


#: FLOPs of an eigh/SVD with vectors of a d x d problem, per d^3 (~9-10 d^3)
DECOMP_FLOPS_PER_CUBE = 10.0


class PhasePlanner:
    """Gives new matrices refresh phases so each of the T slots gets about the same cost.

    Slot loads persist across calls (ZeRO-3 hands the math one sub-group at a time);
    after a checkpoint load they are rebuilt from the phases stored in the states.
    """

    def __init__(self) -> None:
        self.loads: dict[int, list[float]] = {}
        self._counted: set[int] = set()  # ids of the state dicts already in ``loads``

    def assign(self, states: Sequence[MutableMapping[str, Any]], costs: Sequence[float], update_freq: int) -> None:
        slots = self.loads.setdefault(update_freq, [0.0] * update_freq)
        for st, cost in zip(states, costs):  # phases that came from a checkpoint
            if "refresh_phase" in st and id(st) not in self._counted:
                slots[int(st["refresh_phase"]) % update_freq] += cost
                self._counted.add(id(st))
        fresh = [i for i, st in enumerate(states) if "refresh_phase" not in st]
        for i in sorted(fresh, key=lambda j: (-costs[j], j)):
            slot = min(range(update_freq), key=lambda s: (slots[s], s))
            states[i]["refresh_phase"] = slot
            slots[slot] += costs[i]
            self._counted.add(id(states[i]))


class RefreshAhead:
    """Decompositions computed one step early, off the critical path (``refresh_from="previous"``).

    At the end of step t the optimizer hands the inputs of every matrix due at
    t + 1 (cloned: DeepSpeed reuses gradient buffers) to one worker thread; on
    GPU the thread works on this optimizer's side CUDA stream. The decomposition
    then runs while this rank sends its updates, while DeepSpeed all-gathers
    parameters and during the next forward/backward. Step t + 1 takes the result
    (waiting only if it is not done yet). Before a checkpoint, :meth:`settle`
    writes pending results into the matrices' states (``pending_refresh``), so a
    resumed run installs exactly what the uninterrupted one would have.

    On GPU, tensors cross streams both ways, and the caching allocator only knows
    the stream a block was allocated on: the inputs are recorded on the side
    stream and the results on the stream that takes them, so neither stream gets
    memory the other may still read.
    """

    def __init__(self) -> None:
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: dict[int, tuple[MutableMapping[str, Any], Future, int, torch.device]] = {}
        self._streams = StreamPerDevice()  # device -> this optimizer's side stream

    def side_stream(self, device: torch.device) -> Any:
        """This optimizer's stream for background work on ``device``, created once
        (:class:`~.cuda_streams.StreamPerDevice`)."""
        return self._streams.for_device(device)

    def submit(self, states: Sequence[MutableMapping[str, Any]], compute: Callable[[], list[Any]],
               device: torch.device, inputs: Sequence[Optional[torch.Tensor]] = ()) -> None:
        """Run ``compute()`` (one result per state, in order) in the background.

        ``inputs``: every tensor ``compute`` reads; on GPU their memory is kept from the
        main stream until the side stream has read them.
        """
        if not states:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds_structopt-refresh")
        side = _hand_to_side_stream(self.side_stream(device), inputs) if device.type == "cuda" else None
        self._track(states, self._pool.submit(_run_on_side_stream, compute, device, side), device)

    def _track(self, states: Sequence[MutableMapping[str, Any]], future: Future, device: torch.device) -> None:
        for i, st in enumerate(states):
            self._pending[id(st)] = (st, future, i, device)

    def take(self, st: MutableMapping[str, Any]) -> tuple[bool, Any]:
        """(True, result) if a decomposition was computed ahead for this matrix, else (False, None)."""
        if "pending_refresh" in st:
            return True, _unpack(st.pop("pending_refresh"))
        entry = self._pending.pop(id(st), None)
        if entry is None:
            return False, None
        _, future, i, device = entry
        results, done = future.result()
        if done is not None:
            _receive_on_current_stream(results[i], done, device)
        return True, results[i]

    def settle(self) -> None:
        """Wait for every pending decomposition and park its result in the matrix's state."""
        for st, future, i, device in list(self._pending.values()):
            results, done = future.result()
            if done is not None:
                done.synchronize()
                _receive_on_current_stream(results[i], done, device)
            st["pending_refresh"] = _pack(results[i])
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)




def _hand_to_side_stream(stream: Any, inputs: Sequence[Optional[torch.Tensor]]) -> tuple[Any, Any]:
    """(stream, ready): ``ready`` marks the main stream's work so far (the clones just made);
    the inputs are recorded on ``stream`` so that freeing them on the main thread does not let
    the main stream reuse their memory before the side stream has read them."""
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(stream.device))
    for t in inputs:
        if t is not None and t.is_cuda:
            t.record_stream(stream)
    return stream, ready


def _receive_on_current_stream(result: Any, done: Any, device: torch.device) -> None:
    """Make the current stream wait for the side stream's result and record the result's tensors
    on it: they were allocated on the side stream, which could otherwise reuse them once freed
    while the current stream still reads them."""
    stream = torch.cuda.current_stream(device)
    stream.wait_event(done)
    for t in _tensors(result):
        t.record_stream(stream)


def _tensors(result: Any) -> list[torch.Tensor]:
    """The tensors of one result: a tensor, a tuple of tensors/None, or None (a failure)."""
    parts = result if isinstance(result, (tuple, list)) else (result,)
    return [t for t in parts if isinstance(t, torch.Tensor)]


def _run_on_side_stream(compute: Callable[[], list[Any]], device: torch.device,
                        side: Optional[tuple[Any, Any]]) -> tuple[list[Any], Optional[Any]]:
    """The worker's job: ``compute()`` with full fp32 matmuls; on GPU on the side stream, after ``ready``."""
    if side is None:
        with full_fp32_matmul():
            return compute(), None
    stream, ready = side
    # A new thread's current device is GPU 0: without this, every local rank would create a context there.
    torch.cuda.set_device(stream.device)
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        with full_fp32_matmul():
            out = compute()
        done = torch.cuda.Event()
        done.record(stream)
    return out, done


def _pack(result: Any) -> dict[str, Any]:
    """A result as plain containers of tensors (``torch.load(weights_only=True)`` reads them back)."""
    if result is None:
        return {"ok": False}
    if isinstance(result, tuple):
        return {"ok": True, "parts": list(result)}
    return {"ok": True, "value": result}


def _unpack(packed: dict[str, Any]) -> Any:
    if not packed["ok"]:
        return None
    return tuple(packed["parts"]) if "parts" in packed else packed["value"]
