"""Where DeepSpeed puts each parameter's elements across data-parallel ranks, per ZeRO stage.

Mirrors DeepSpeed 0.19 (``stage_1_and_2.py``, ``partition_parameters.py``) with its
defaults: stage 1/2 concatenate each param group in order (no per-parameter
alignment), pad the end to a multiple of 2 x world, and cut equal partitions;
stage 3 splits every parameter on its own into ceil(numel / world) pieces;
stage 0 leaves everything everywhere. The planner needs this because the
"local" ownership plan and the bytes our step moves depend on which matrices a
partition boundary cuts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .model_shapes import ParamSpec


def zero12_partition_numel(params: Sequence[ParamSpec], world: int) -> int:
    """Elements of each rank's ZeRO-1/2 partition of one param group (the group padded to 2 x world)."""
    total = sum(p.numel for p in params)
    return (total + (-total) % (2 * world)) // world


def zero3_partition_numel(p: ParamSpec, world: int) -> int:
    """Elements of each rank's ZeRO-3 partition of one parameter (``partition_numel``)."""
    return -(-p.numel // world)


def holdings(groups: Sequence[Sequence[ParamSpec]], world: int, stage: int) -> dict[str, list[tuple[int, int, int]]]:
    """Parameter name -> [(rank, start in the flattened parameter, numel)] of every piece."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for params in groups:
        if stage == 0 or world == 1:
            for p in params:
                out[p.name] = [(r, 0, p.numel) for r in range(world)]
        elif stage in (1, 2):
            size = zero12_partition_numel(params, world)
            bounds = [(r * size, (r + 1) * size) for r in range(world)]
            offset = 0
            for p in params:
                pieces = []
                for r, (lo, hi) in enumerate(bounds):
                    a, b = max(lo, offset), min(hi, offset + p.numel)
                    if a < b:
                        pieces.append((r, a - offset, b - a))
                out[p.name] = pieces
                offset += p.numel
        elif stage == 3:
            for p in params:
                chunk = zero3_partition_numel(p, world)
                out[p.name] = [(r, r * chunk, min(chunk, p.numel - r * chunk))
                               for r in range(world) if p.numel - r * chunk > 0]
        else:
            raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {stage!r}")
    return out


def held_counts(pieces: dict[str, list[tuple[int, int, int]]], world: int) -> dict[str, list[int]]:
    """Elements of each parameter on each rank."""
    out = {}
    for name, items in pieces.items():
        counts = [0] * world
        for r, _, n in items:
            counts[r] += n
        out[name] = counts
    return out


@dataclass
class StepCall:
    """One ``step()`` call DeepSpeed makes on a rank (a param group at ZeRO-0/1/2, a sub-group
    at ZeRO-3): its parameters, every rank's pieces of them, and this rank's partition."""

    params: list[ParamSpec]
    holders: dict[str, list[tuple[int, int, int]]]  # name -> [(rank, start, numel)]
    offsets: dict[str, int]   # this rank's piece of a parameter -> its offset in the partition
    held: dict[str, int]      # elements of each parameter this rank holds
    partition: int            # elements of this rank's gradient partition (0: no flat partition)

    @property
    def matrices(self) -> list[ParamSpec]:
        return [p for p in self.params if p.is_matrix and self.holders.get(p.name)]

    def mine(self, p: ParamSpec) -> int:
        return self.held.get(p.name, 0)

    def contiguous(self, params: Sequence[ParamSpec]) -> bool:
        """Whether this rank's pieces of ``params`` lie end to end in its partition (a message
        of them is then a view, not a copy)."""
        pieces = [(self.offsets[p.name], self.held[p.name]) for p in params if self.held.get(p.name)]
        if len(pieces) <= 1:
            return True
        return self.partition > 0 and all(b[0] == a[0] + a[1] for a, b in zip(pieces, pieces[1:]))


def step_calls(groups: Sequence[Sequence[ParamSpec]], world: int, stage: int, rank: int,
               sub_group_size: int = int(1e9)) -> list[StepCall]:
    """The ``step()`` calls of one optimizer step on ``rank``, in DeepSpeed's order."""
    calls = []
    for params in groups:
        pieces = holdings([params], world, stage)
        held = {name: sum(n for r, _, n in items if r == rank) for name, items in pieces.items()}
        if stage == 0 or world == 1:
            calls.append(StepCall(list(params), pieces, {}, held, 0))
        elif stage in (1, 2):
            size = zero12_partition_numel(params, world)
            offsets, at = {}, 0
            for p in params:
                offsets[p.name] = max(0, at - rank * size)
                at += p.numel
            calls.append(StepCall(list(params), pieces, offsets, held, size))
        else:
            for sub in zero3_sub_groups(params, world, sub_group_size):
                offsets, at = {}, 0
                for p in sub:
                    offsets[p.name] = at
                    at += zero3_partition_numel(p, world)
                calls.append(StepCall(sub, {p.name: pieces[p.name] for p in sub}, offsets,
                                      {p.name: held[p.name] for p in sub}, at))
    return calls


def zero3_sub_groups(params: Sequence[ParamSpec], world: int, sub_group_size: int) -> list[list[ParamSpec]]:
    """DeepSpeed 0.19's ``_create_fp16_sub_groups``: consecutive parameters until their
    partitions reach ``sub_group_size`` elements."""
    per_rank = [zero3_partition_numel(p, world) for p in params]
    if sub_group_size >= sum(per_rank):
        return [list(params)]
    out, current, size = [], [], 0
    for p, n in zip(params, per_rank):
        current.append(p)
        size += n
        if size >= sub_group_size or p is params[-1]:
            out.append(current)
            current, size = [], 0
    return out
