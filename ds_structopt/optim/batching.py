"""Grouping of same-shape matrices into bounded stacks for batched linear algebra.

Stacking copies its inputs, so stacks are split into chunks whose size stays
under a byte budget: big models get fewer, larger calls without doubling the
optimizer's memory at once.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Iterator, Optional, Sequence

import torch
from torch import Tensor

DEFAULT_MAX_STACK_BYTES = 256 * 2**20


def buckets(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Indices grouped by key, keeping first-seen order (deterministic)."""
    out: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        out[key].append(i)
    return dict(out)


def chunks(indices: Sequence[int], bytes_per_item: int, max_bytes: Optional[int] = None) -> Iterator[list[int]]:
    """Split indices so that one stack of them uses at most ``max_bytes`` (at least one item)."""
    if max_bytes is None:
        max_bytes = DEFAULT_MAX_STACK_BYTES
    per_chunk = max(1, max_bytes // max(1, bytes_per_item))
    for start in range(0, len(indices), per_chunk):
        yield list(indices[start : start + per_chunk])


def stack(items: Sequence[Tensor]) -> Tensor:
    """torch.stack, but a single item becomes a view (no copy)."""
    return items[0].unsqueeze(0) if len(items) == 1 else torch.stack(list(items))
