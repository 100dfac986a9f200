"""Which rank owns which matrix: longest-processing-time-first balancing of each family's own cost.

Every structured matrix gets exactly one owner; only the owner keeps its
basis/factors and moments and computes its update. A matrix's cost comes from
its optimizer family (``StructuredOptimizer.amortized_flops`` / ``state_elements``
for its options: which sides rotate, Newton-Schulz iterations, the refresh
period), the same numbers the planner and refresh staggering use. The plan is a
pure function of (names, costs, world size, and for the "local" plan which rank
holds how much of each matrix), so every rank computes the same plan.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from ..optim.base import StructuredOptimizer

COST_MODELS = ("flops", "memory", "numel")


@dataclass(frozen=True)
class MatrixInfo:
    """A matrix to place, with what owning it costs under its family and options."""

    name: str
    rows: int
    cols: int
    flops: float   # per step, refresh amortized (``amortized_flops``)
    elements: int  # state elements (``state_elements``)

    @classmethod
    def of(cls, name: str, rows: int, cols: int, family: type[StructuredOptimizer],
           options: dict[str, Any]) -> "MatrixInfo":
        """The matrix with its family's costs for ``options`` (resolved: every key present)."""
        return cls(name, rows, cols, family.amortized_flops(rows, cols, options),
                   family.state_elements(rows, cols, options))


def matrix_cost(info: MatrixInfo, model: str) -> float:
    """What ``model`` balances: "flops" (the family's work per step), "memory" (its state
    elements) or "numel" (elements of the matrix)."""
    if model == "flops":
        return info.flops
    if model == "memory":
        return info.elements
    if model == "numel":
        return info.rows * info.cols
    raise ValueError(f"unknown cost_model '{model}'; expected one of {list(COST_MODELS)}")


def plan_owners(matrices: Sequence[MatrixInfo], world_size: int, cost_model: str = "flops") -> dict[str, int]:
    """Assign each matrix to a rank so that the most loaded rank carries as little as possible.

    The better of two deterministic plans: LPT (largest cost first, to the least-loaded
    rank) and MULTIFIT-style packing (the smallest per-rank capacity, found by bisection,
    into which best-fit-decreasing packs everything). LPT alone stays up to 4/3 off the
    optimum and is ~1.2x off at 70B shapes on 128-256 ranks, where a few hundred large
    MLP matrices meet many small ones; the packing closes most of that gap.
    """
    costs = [matrix_cost(m, cost_model) for m in matrices]
    order = sorted(range(len(matrices)), key=lambda i: (-costs[i], i))
    best = _lpt(order, costs, world_size)
    hi = _max_load(best, costs, world_size)
    lo = max(sum(costs) / max(1, world_size), max(costs, default=0.0))
    for _ in range(30):
        if hi - lo <= 1e-3 * hi:
            break
        mid = (lo + hi) / 2
        packed = _best_fit(order, costs, world_size, mid)
        if packed is None:
            lo = mid
        else:
            best, hi = packed, _max_load(packed, costs, world_size)
    return {matrices[i].name: best[i] for i in range(len(matrices))}


def _lpt(order: list[int], costs: list[float], world_size: int) -> list[int]:
    heap = [(0.0, rank) for rank in range(world_size)]
    owner = [0] * len(costs)
    for i in order:
        load, rank = heapq.heappop(heap)
        owner[i] = rank
        heapq.heappush(heap, (load + costs[i], rank))
    return owner


def _best_fit(order: list[int], costs: list[float], world_size: int, capacity: float) -> Optional[list[int]]:
    """Each matrix, largest first, onto the fullest rank it still fits under ``capacity``;
    None when one does not fit anywhere."""
    bins = [(0.0, rank) for rank in range(world_size)]  # sorted by (load, rank)
    owner = [0] * len(costs)
    for i in order:
        at = bisect.bisect_right(bins, (capacity - costs[i], world_size)) - 1
        if at < 0:
            return None
        load, rank = bins.pop(at)
        owner[i] = rank
        bisect.insort(bins, (load + costs[i], rank))
    return owner


def _max_load(owner: list[int], costs: list[float], world_size: int) -> float:
    load = [0.0] * world_size
    for rank, c in zip(owner, costs):
        load[rank] += c
    return max(load, default=0.0)


def plan_owners_local(matrices: Sequence[MatrixInfo], held: Mapping[str, Sequence[int]], world_size: int,
                      cost_model: str = "flops", slack: float = 0.1) -> dict[str, int]:
    """Prefer the rank that already holds most of a matrix, within a load cap; else the fullest
    rank it fits on under the cap.

    ``held[name][r]`` = elements of the matrix in rank r's ZeRO partition. A matrix owned
    where it lives needs no gradient gather and no update return, so at ZeRO-1/2 (where
    DeepSpeed's partitions keep most matrices whole) communication drops to the few
    matrices cut by partition boundaries. The cap, (1 + slack) x the mean cost per rank
    (or the balanced plan's maximum where that is higher: large matrices on many ranks),
    keeps refresh/rotation work balanced; if locality cannot meet it, the balanced plan
    (:func:`plan_owners`) is used. Largest cost first; ties break on rank id and input
    order, so every rank computes the same plan.
    """
    balanced = plan_owners(matrices, world_size, cost_model)
    costs = [matrix_cost(m, cost_model) for m in matrices]
    cap = max((1.0 + slack) * sum(costs) / max(1, world_size),
              _max_load([balanced[m.name] for m in matrices], costs, world_size))
    order = sorted(range(len(matrices)), key=lambda i: (-costs[i], i))
    load = [0.0] * world_size
    owners: dict[str, int] = {}
    for i in order:
        name = matrices[i].name
        counts = list(held.get(name, ())) + [0] * world_size
        most = max(counts[:world_size])
        # among the ranks holding the most of it (all of them when replicated, as at stage 0
        # or with ZeRO-3's even split) the least loaded
        best = min((r for r in range(world_size) if counts[r] == most), key=lambda r: (load[r], r))
        if most == 0 or load[best] + costs[i] > cap:
            fitting = [r for r in range(world_size) if load[r] + costs[i] <= cap]
            if not fitting:
                return balanced
            best = max(fitting, key=lambda r: (load[r], -r))
        owners[name] = best
        load[best] += costs[i]
    return owners


def loads(matrices: Sequence[MatrixInfo], owners: Mapping[str, Union[int, Sequence[int]]], world_size: int,
          cost_model: str = "flops") -> list[float]:
    """Total cost per rank under a plan (for reports and tests); ``owners``: one rank per matrix,
    or its owner in every replica group (``plan_replica_owners``)."""
    out = [0.0] * world_size
    for info in matrices:
        ranks = owners[info.name]
        for rank in [ranks] if isinstance(ranks, int) else ranks:
            out[rank] += matrix_cost(info, cost_model)
    return out


def plan_replica_owners(matrices: Sequence[MatrixInfo], world_size: int, group_size: int, cost_model: str = "flops",
                        held: Optional[Mapping[str, Sequence[int]]] = None) -> dict[str, list[int]]:
    """One owner per matrix in every replica group of ``group_size`` consecutive ranks.

    ``held`` (elements of each matrix per rank) selects the locality plan within each group;
    None is the balanced plan (``plan_owners``). With one group (``group_size == world_size``) this is the flat plan.
    """
    out: dict[str, list[int]] = {m.name: [] for m in matrices}
    for base in range(0, world_size, group_size):
        if held is None:
            local = plan_owners(matrices, group_size, cost_model)
        else:
            in_group = {name: list(counts[base:base + group_size]) for name, counts in held.items()}
            local = plan_owners_local(matrices, in_group, group_size, cost_model)
        for name, rank in local.items():
            out[name].append(base + rank)
    return out


def group_fan_out_note(zero_stage: int, world_size: int, group_size: int) -> Optional[str]:
    """One line for rank 0 when owner groups (``ownership_group_size``) meet ZeRO-3, else None.

    At ZeRO-3 every rank holds a piece of every matrix, and each group has its own owner of
    each matrix, so every rank sends every piece to world/group owners: messages, and the
    step's Python, grow with the world (simulated, 7B at 1024 ranks in groups of 8: 142-214 ms
    per plain step against 7-15 ms with one owner per matrix; docs/benchmarks.md)."""
    if zero_stage != 3 or group_size >= world_size:
        return None
    return (f"ds_structopt: ownership_group_size={group_size} at ZeRO-3: each rank sends its piece of every matrix "
            f"to {world_size // group_size} owners (one per group), so messages grow with the world; flat "
            "ownership (ownership_group_size null) costs far less at ZeRO-3")
