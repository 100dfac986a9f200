"""One-process language-model steps shared by the demo and the convergence benchmark."""
from __future__ import annotations

from typing import Optional

import torch


def lm_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rows: torch.Tensor, clip: float = 1.0,
            micro: Optional[int] = None) -> torch.Tensor:
    """Next-token loss on ``rows`` (inputs = all but the last token), backward, clip, step; returns the
    batch's mean loss (detached). ``micro``: rows per forward (gradient accumulation); the gradient
    is the whole batch's mean either way."""
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=rows.device)
    for part in rows.split(micro or len(rows)):
        loss = model(input_ids=part[:, :-1], labels=part[:, 1:].contiguous()).loss * (len(part) / len(rows))
        loss.backward()
        total += loss.detach().float()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return total


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over ``rows`` in batches of ``batch`` (weighted by rows)."""
    model.eval()
    total, count = 0.0, 0
    for b in rows.long().split(batch):
        total += model(input_ids=b[:, :-1], labels=b[:, 1:].contiguous()).loss.item() * len(b)
        count += len(b)
    model.train()
    return total / max(1, count)
