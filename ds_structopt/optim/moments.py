"""Diagonal second-moment rules applied in a rotated space: Adam's and Adafactor's.

Both take the rotated gradients of many matrices and their state dicts and
return the update directions (still in the rotated space). Adam's path runs as
multi-tensor ``torch._foreach_*`` kernels over all matrices at once.
"""
from __future__ import annotations

import math
from typing import Any, MutableMapping, Optional, Sequence

import torch
from torch import Tensor


def moment_step(st: MutableMapping[str, Any]) -> int:
    """Steps the moments have averaged (for bias correction): all of them unless they were
    reset at a basis refresh (``moments="reset"`` records the step before in ``moment_t0``)."""
    return st["step"] - st.get("moment_t0", 0)


def adam_directions(
    rotated: Sequence[Tensor],
    states: Sequence[MutableMapping[str, Any]],
    betas: tuple[float, float],
    eps: float,
    out: Optional[Sequence[Tensor]] = None,
) -> list[Tensor]:
    """Mh / (sqrt(Vh) + eps) with bias-corrected EMA moments (state 'exp_avg', 'exp_avg_sq');
    written into ``out`` (scratch, may be ``rotated``) when given."""
    beta1, beta2 = betas
    exp_avgs = [st["exp_avg"] for st in states]
    exp_avg_sqs = [st["exp_avg_sq"] for st in states]
    torch._foreach_lerp_(exp_avgs, list(rotated), 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, list(rotated), list(rotated), 1.0 - beta2)
    steps = [moment_step(st) for st in states]
    if out is None:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    else:
        denom = [torch.sqrt(v, out=o) for v, o in zip(exp_avg_sqs, out)]
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    for m, d in zip(exp_avgs, denom):  # the quotient in the denominator's memory: one m x n less at peak
        torch.div(m, d, out=d)
    torch._foreach_div_(denom, [1.0 - beta1**t for t in steps])
    return denom


def factored_directions(
    rotated: Sequence[Tensor],
    states: Sequence[MutableMapping[str, Any]],
    betas: tuple[float, float],
    eps1: float,
    clip_threshold: float,
    beta2_decay: Optional[float],
    out: Optional[Sequence[Tensor]] = None,
) -> list[Tensor]:
    """Adafactor in the rotated space: factored second moment, optional momentum, update clipping.

    r = b2 r + (1-b2) rowmean(G~^2 + eps1), c likewise over columns,
    Vh = r c^T / mean(r); U = (Mh or G~) / sqrt(Vh); U /= max(1, RMS(U)/d).
    With a fixed b2 the moments are bias-corrected like Adam's; with
    ``beta2_decay`` (e.g. -0.8) b2_t = 1 - t^decay, which needs no correction.
    With ``out`` (scratch, may be ``rotated``) each update is written there once G~ is read.
    """
    beta1, beta2 = betas
    res = []
    for k, (g, st) in enumerate(zip(rotated, states)):
        t = moment_step(st)
        if beta2_decay is None:
            b2t, correction = beta2, 1.0 - beta2**t
        else:
            b2t, correction = 1.0 - t**beta2_decay, 1.0
        sq = g * g
        sq.add_(eps1)
        row, col = st["row_sq"], st["col_sq"]
        row.lerp_(sq.mean(dim=1), 1.0 - b2t)
        col.lerp_(sq.mean(dim=0), 1.0 - b2t)
        del sq
        if beta1 > 0:  # G~'s last reader: from here its memory may hold the update
            st["exp_avg"].lerp_(g, 1.0 - beta1)
        # 1/sqrt(Vh) = rsqrt(r) rsqrt(c)^T sqrt(mean(r) * correction)
        target = out[k] if out is not None and beta1 > 0 else None
        inv_sqrt_v = torch.outer(row.rsqrt(), col.rsqrt(), out=target)
        inv_sqrt_v.mul_((row.mean() * correction).sqrt())
        if beta1 > 0:
            update = inv_sqrt_v.mul_(st["exp_avg"]).div_(1.0 - beta1**t)
        else:
            update = inv_sqrt_v.mul_(g)
            update = update if out is None else out[k].copy_(update)
        rms = update.square().mean().sqrt()
        update.div_((rms / clip_threshold).clamp_min(1.0))
        res.append(update)
    return res
