"""Which rank owns which matrix: a cost model and longest-processing-time-first balancing.

Every structured matrix gets exactly one owner; only the owner keeps its
basis/factors and moments and computes its update. The plan is a pure function
of (names, shapes, options, world size), so every rank computes the same plan
without communicating.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class MatrixInfo:
    name: str
    rows: int
    cols: int


def matrix_cost(info: MatrixInfo, model: str, update_freq: int = 200) -> float:
    """Relative cost of owning a matrix.

    "flops": rotations mn(m+n) every step + decompositions (m^3 + n^3) amortized
    over the refresh period + elementwise mn; "memory": state elements
    mn + m^2 + n^2 (moments plus bases); "numel": mn.
    """
    m, n = info.rows, info.cols
    if model == "flops":
        return m * n * (m + n) + (m**3 + n**3) / max(1, update_freq) + m * n
    if model == "memory":
        return m * n + m * m + n * n
    if model == "numel":
        return m * n
    raise ValueError(f"unknown cost_model '{model}'; expected one of ['flops', 'memory', 'numel']")


def plan_owners(matrices: Sequence[MatrixInfo], world_size: int, cost_model: str = "flops", update_freq: int = 200) -> dict[str, int]:
    """Assign each matrix to a rank: largest cost first, to the currently least-loaded rank.

    Ties break on rank id and the input order, so the plan is deterministic.
    """
    order = sorted(range(len(matrices)), key=lambda i: (-matrix_cost(matrices[i], cost_model, update_freq), i))
    heap = [(0.0, rank) for rank in range(world_size)]
    owners: dict[str, int] = {}
    for i in order:
        load, rank = heapq.heappop(heap)
        owners[matrices[i].name] = rank
        heapq.heappush(heap, (load + matrix_cost(matrices[i], cost_model, update_freq), rank))
    return owners


def loads(matrices: Sequence[MatrixInfo], owners: Mapping[str, int], world_size: int, cost_model: str = "flops") -> list[float]:
    """Total cost per rank under a plan (for reports and tests)."""
    out = [0.0] * world_size
    for info in matrices:
        out[owners[info.name]] += matrix_cost(info, cost_model)
    return out
