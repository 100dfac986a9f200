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

from typing import Any, MutableMapping, Sequence


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
