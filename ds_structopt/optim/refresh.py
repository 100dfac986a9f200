"""When a matrix refreshes its basis: every T steps, optionally staggered by a per-matrix phase.

Refreshing every matrix at the same step makes that step several times slower
and stalls every rank. With ``stagger_refresh=True`` each matrix gets a phase
in [0, T): it refreshes at t = 1 (a first basis is needed) and then whenever
(t - 1) mod T == phase. Phases are chosen longest-decomposition-first into the
least-loaded of the T slots, so every step carries about the same refresh work
(on each owner rank, since only owners call the math). The phase lives in the
matrix's state, so it is checkpointed and a resumed run keeps its schedule.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, MutableMapping, Optional, Sequence

import torch


def refresh_due(step: int, update_freq: int, phase: int = 0) -> bool:
    """Is step ``step`` (1-based) a refresh step for a matrix with this phase?"""
    return step == 1 or (step - 1) % update_freq == phase % update_freq


def decomposition_cost(rows: int, cols: int, left: bool, right: bool) -> float:
    """SVD/eigh work of one refresh: cubic in each rotated side."""
    return (rows**3 if left else 0) + (cols**3 if right else 0)


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
    GPU the thread works on a side CUDA stream. The decomposition then runs
    while this rank sends its updates, while DeepSpeed all-gathers parameters
    and during the next forward/backward. Step t + 1 takes the result (waiting
    only if it is not done yet). Before a checkpoint, :meth:`settle` writes
    pending results into the matrices' states (``pending_refresh``), so a
    resumed run installs exactly what the uninterrupted one would have.
    """

    def __init__(self) -> None:
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: dict[int, tuple[MutableMapping[str, Any], Future, int]] = {}

    def submit(self, states: Sequence[MutableMapping[str, Any]], compute: Callable[[], list[Any]],
               device: torch.device) -> None:
        """Run ``compute()`` (one result per state, in order) in the background."""
        if not states:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds_structopt-refresh")
        ready = None
        if device.type == "cuda":  # the side stream must see the clones the main stream just made
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        future = self._pool.submit(_run_on_side_stream, compute, device, ready)
        for i, st in enumerate(states):
            self._pending[id(st)] = (st, future, i)

    def take(self, st: MutableMapping[str, Any]) -> tuple[bool, Any]:
        """(True, result) if a decomposition was computed ahead for this matrix, else (False, None)."""
        if "pending_refresh" in st:
            return True, _unpack(st.pop("pending_refresh"))
        entry = self._pending.pop(id(st), None)
        if entry is None:
            return False, None
        _, future, i = entry
        results, done = future.result()
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
        return True, results[i]

    def settle(self) -> None:
        """Wait for every pending decomposition and park its result in the matrix's state."""
        for st, future, i in list(self._pending.values()):
            results, done = future.result()
            if done is not None:
                done.synchronize()
            st["pending_refresh"] = _pack(results[i])
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)


def _run_on_side_stream(compute: Callable[[], list[Any]], device: torch.device,
                        ready: Optional[Any]) -> tuple[list[Any], Optional[Any]]:
    if ready is None:
        return compute(), None
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
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
