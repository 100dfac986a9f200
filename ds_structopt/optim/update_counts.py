"""Per-step counts of which parameters got the structured update and which went to AdamW.

Every ZeRO/bf16/FSDP stack has at some point handed a structured optimizer 1-D flat
tensors, or bypassed it, so that the preconditioner silently never ran while the loss
still went down. These counts make that visible: each optimizer step records how many
matrices got a structured update (on the ranks that computed them) and how many
parameters went to the elementwise AdamW path; ``metrics()`` reports them, training logs
print them, and rank 0 prints one line at start-up (:func:`startup_line`). Counting is
host bookkeeping on values the step already has: no device read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class UpdateCounts:
    """``eligible_matrices``/``elementwise_params``: what the model has. ``structured``: matrices
    this process updated with the structured math in the last optimizer step (an owner's share
    where matrices have owners); ``elementwise``: parameters AdamW stepped in it (the whole
    model's count where every rank knows it); totals over the run."""

    eligible_matrices: int = 0
    elementwise_params: int = 0
    steps: int = 0
    structured: int = 0
    elementwise: int = 0
    structured_total: int = 0
    elementwise_total: int = 0

    def begin_step(self) -> None:
        """A new optimizer step (not a micro-batch, not a skipped step) starts."""
        self.steps += 1
        self.structured = 0
        self.elementwise = 0

    def add(self, structured: int = 0, elementwise: int = 0) -> None:
        self.structured += structured
        self.structured_total += structured
        self.elementwise += elementwise
        self.elementwise_total += elementwise

    def metrics(self) -> dict[str, int]:
        return {"eligible_matrices": self.eligible_matrices, "elementwise_params": self.elementwise_params,
                "optimizer_steps": self.steps, "structured_updates": self.structured,
                "elementwise_updates": self.elementwise, "structured_updates_total": self.structured_total,
                "elementwise_updates_total": self.elementwise_total}


def startup_line(optimizer: str, matrices: Sequence[str], elementwise: Sequence[str], where: str = "") -> str:
    """The one line rank 0 prints: how many matrices ``optimizer`` preconditions and how many
    parameters go to AdamW (with a few names of each, so a wrong split shows)."""
    def some(names: Sequence[str]) -> str:
        shown = ", ".join(names[:3])
        return f" ({shown}{', ...' if len(names) > 3 else ''})" if names else ""

    line = (f"ds_structopt: {optimizer} preconditions {len(matrices)} matrices{some(matrices)}; "
            f"AdamW steps {len(elementwise)} parameters{some(elementwise)}")
    if not matrices:
        line += " -- WARNING: no parameter gets the structured update"
    return line + (f" [{where}]" if where else "")
