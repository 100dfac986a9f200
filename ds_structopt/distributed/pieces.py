"""Where a rank's pieces of each parameter come from: one small adapter per layout.

A ``Piece`` is a contiguous range of a flattened parameter that this rank stores, and the
tensor its gradient arrives on. The layouts:

- whole parameters (no partitioning, or DeepSpeed's per-parameter fp32 master copies):
  ``whole_piece``;
- DeepSpeed ZeRO-1/2 flat partitions, mapped back through ``_hp_mapping``: ``hp_mapping_piece``;
- DeepSpeed ZeRO-3 flat sub-group partitions, from the layout the integration registers:
  ``flat_layout_piece``;
- FSDP2 DTensor shards (dim 0): ``dtensor_pieces``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class Piece:
    """A contiguous range of a parameter (flattened) and where it lives on this rank."""

    start: int     # offset in the flattened parameter
    numel: int
    param: Tensor  # this rank's fp32 storage of the range (a 1-D view)
    source: Tensor  # the tensor DeepSpeed puts the gradient on (the param itself or the flat partition)
    offset: int    # where the range starts in ``source``
    # its gradient is a DeepSpeed partition's (dropped or zeroed after the step): ours to
    # overwrite once sent (updates written into it); a model's own .grad never is
    scratch: bool = False
    fp32: bool = field(init=False)  # ``param`` is fp32 (read once, when the piece is made)

    def __post_init__(self) -> None:
        self.fp32 = self.param.dtype == torch.float32

    def grad(self) -> Optional[Tensor]:
        g = self.source.grad
        if g is None:
            return None
        return local(g).reshape(-1).narrow(0, self.offset, self.numel)


@dataclass
class Entry:
    name: str
    lp: Tensor                 # the model's parameter object (shape, names, _hp_mapping)
    shape: torch.Size
    is_matrix: bool
    pieces: list[Piece] = field(default_factory=list)  # filled per step (views into the partition)


def whole_piece(param: Tensor) -> Piece:
    """The whole parameter as one piece (its gradient on itself)."""
    return Piece(0, param.numel(), param.view(-1), param, 0)


def hp_mapping_piece(lp: Tensor, flat: Tensor) -> Optional[Piece]:
    """The range of model parameter ``lp`` that DeepSpeed's ZeRO-1/2 put in this rank's flat
    partition ``flat`` (``lp._hp_mapping``); None when none of it is here."""
    mapping = getattr(lp, "_hp_mapping", None)
    if mapping is None:
        return None
    lp_addr, hp_addr = mapping.lp_fragment_address, mapping.hp_fragment_address
    return Piece(lp_addr.start, lp_addr.numel, flat.narrow(0, hp_addr.start, hp_addr.numel), flat, hp_addr.start,
                 scratch=True)


def flat_layout_piece(flat: Tensor, offset: int, start: int, numel: int) -> Optional[Piece]:
    """A ZeRO-3 range: ``numel`` elements of a parameter from ``start``, at ``offset`` in ``flat``."""
    return Piece(start, numel, flat.narrow(0, offset, numel), flat, offset, scratch=True) if numel > 0 else None


def is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local(t: Tensor) -> Tensor:
    """This rank's storage of a tensor (the local shard of an FSDP2 DTensor, else the tensor)."""
    return t.to_local() if is_dtensor(t) else t


def dtensor_pieces(param: Tensor) -> list[Piece]:
    """The piece of an FSDP2 parameter (sharded on dim 0, torch.chunk sizes) this rank holds."""
    placements = param.placements
    if len(placements) != 1 or not placements[0].is_shard() or placements[0].dim != 0:
        raise RuntimeError(f"FSDP2 parameters must be sharded on dim 0 over one mesh dimension, got {placements}")
    local = param.to_local()
    if local.numel() == 0:
        return []
    rows = param.shape[0]
    world = param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    row_size = local.numel() // local.shape[0]
    return [Piece(rank * chunk * row_size, local.numel(), local.view(-1), param, 0)]


def split_ranges(t: Tensor, ranges: Iterable[tuple[int, int]]) -> dict[tuple[int, int], Tensor]:
    """Views of 1-D ``t`` at ``ranges`` ((start, numel), disjoint): {range: view}, made by one
    ``split_with_sizes`` over the ranges and the gaps between them instead of a ``narrow`` per range
    (at ZeRO-3 an owner receives one range of its matrix from every rank of the world)."""
    ordered = sorted(set(ranges))
    sizes: list[int] = []
    at_index: list[Optional[tuple[int, int]]] = []
    pos = 0
    for start, numel in ordered:
        if start < pos:  # overlapping ranges: no tiling, one view each
            return {r: t.narrow(0, r[0], r[1]) for r in ordered}
        if start > pos:
            sizes.append(start - pos)
            at_index.append(None)
        sizes.append(numel)
        at_index.append((start, numel))
        pos = start + numel
    if not ordered:
        return {}
    if len(ordered) == 1:
        start, numel = ordered[0]
        return {ordered[0]: t if start == 0 and numel == t.shape[0] else t.narrow(0, start, numel)}
    total = t.shape[0]
    if pos < total:
        sizes.append(total - pos)
        at_index.append(None)
    return {r: view for r, view in zip(at_index, t.split_with_sizes(sizes)) if r is not None}


class GradViews:
    """This step's gradient views of pieces (as ``Piece.grad``), made with one ``.grad`` read, one
    reshape and one split per source tensor rather than three calls per piece: at ZeRO-3 a rank
    holds a piece of every parameter in one partition. Make one per step: it holds the gradients
    as long as the caller keeps it. A piece it was not made with (pieces made again since) gets
    ``Piece.grad``."""

    def __init__(self, pieces: Sequence[Piece]) -> None:
        by_source: dict[int, list[Piece]] = {}
        for piece in pieces:
            by_source.setdefault(id(piece.source), []).append(piece)
        self._views: dict[int, tuple[Piece, Optional[Tensor]]] = {}  # id -> (the piece, kept alive: ids stay unique)
        for same in by_source.values():
            g = same[0].source.grad
            if g is None:
                self._views.update((id(p), (p, None)) for p in same)
                continue
            views = split_ranges(local(g).reshape(-1), [(p.offset, p.numel) for p in same])
            self._views.update((id(p), (p, views[(p.offset, p.numel)])) for p in same)

    def of(self, piece: Piece) -> Optional[Tensor]:
        hit = self._views.get(id(piece))
        return hit[1] if hit is not None and hit[0] is piece else piece.grad()


def cut(tensors: list[Tensor], ranges: list[tuple[int, int, int]]) -> list[tuple[Tensor, int]]:
    """``tensors`` laid end to end (as DeepSpeed flattens them onto a partition), cut into views at
    the edges of ``ranges`` ((offset, numel, slot), disjoint): [(view, slot)], slot -1 outside
    every range. No copies (a non-contiguous tensor is flattened with one)."""
    ranges = sorted(ranges)
    out: list[tuple[Tensor, int]] = []
    pos, i = 0, 0
    for t in tensors:
        flat = t.reshape(-1)
        end = pos + flat.numel()
        at = pos
        while at < end:
            while i < len(ranges) and ranges[i][0] + ranges[i][1] <= at:
                i += 1
            if i < len(ranges) and ranges[i][0] <= at:
                stop, slot = min(end, ranges[i][0] + ranges[i][1]), ranges[i][2]
            else:
                stop, slot = (min(end, ranges[i][0]) if i < len(ranges) else end), -1
            out.append((flat.narrow(0, at - pos, stop - at), slot))
            at = stop
        pos = end
    return out


def shape_numel(shape: Iterable[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def covered(holders: list[tuple[int, int, int]], rank: int, numel: int) -> bool:
    """Does ``rank`` hold the whole parameter (pieces adding up to all of it)?"""
    return sum(n for r, _, n in holders if r == rank) >= numel
