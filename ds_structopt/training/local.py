"""One-process language-model steps shared by the demo and the convergence benchmark."""
from __future__ import annotations

import torch


def lm_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rows: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """Next-token loss on ``rows`` (inputs = all but the last token), backward, clip, step; returns the loss."""
    loss = model(input_ids=rows[:, :-1], labels=rows[:, 1:].contiguous()).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss


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
