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

from typing import Sequence

from .model_shapes import ParamSpec


def holdings(groups: Sequence[Sequence[ParamSpec]], world: int, stage: int) -> dict[str, list[tuple[int, int, int]]]:
    """Parameter name -> [(rank, start in the flattened parameter, numel)] of every piece."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for params in groups:
        if stage == 0 or world == 1:
            for p in params:
                out[p.name] = [(r, 0, p.numel) for r in range(world)]
        elif stage in (1, 2):
            total = sum(p.numel for p in params)
            total += (-total) % (2 * world)
            base, extra = divmod(total, world)
            bounds, start = [], 0
            for r in range(world):
                size = base + (1 if r < extra else 0)
                bounds.append((start, start + size))
                start += size
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
                chunk = -(-p.numel // world)
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
