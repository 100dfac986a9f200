"""Learning-rate schedule: linear warmup, then cosine decay to a floor (GaLore/AdaDiag recipe)."""
from __future__ import annotations

import math


def warmup_steps(warmup: float, steps: int) -> int:
    """``--warmup`` as steps: a count when >= 1, else a fraction of ``steps``; at least 1."""
    return int(warmup if warmup >= 1 else warmup * steps) or 1


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Multiplier of the base lr at ``step`` (0-based): (step+1)/warmup, then cosine from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
