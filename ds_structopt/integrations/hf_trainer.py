"""Hugging Face ``Trainer`` with ``TrainingArguments(deepspeed="ds.json")`` naming our optimizer.

``StructOptTrainer`` is a drop-in ``Trainer``: if the DeepSpeed JSON's
``"optimizer"`` block has one of our types, it takes that block (and the
optional ``"ds_structopt"`` block) out of the config Trainer hands to
accelerate/DeepSpeed, so DeepSpeed receives our optimizer as a client
optimizer (built over ``ds_structopt.param_groups(model)``) and the LR
scheduler is the Trainer's own (``lr_scheduler_type``, warmup). ``"auto"``
values in the block are filled by Trainer from ``TrainingArguments`` first;
the blocks are parsed and validated by ``parse_config``, as for ``initialize``.
With any other optimizer type it is exactly ``Trainer``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import Trainer

from ..distributed.options import DistributedOptions
from ..optim.registry import OPTIMIZERS
from .deepspeed_config import parse_config
from .deepspeed_ops import skip_unused_jit_ops

# TrainingArguments(deepspeed=...) starts DeepSpeed's comm backend before any Trainer exists, so
# the unused shm op is marked at import (scripts import StructOptTrainer before making the args).
skip_unused_jit_ops()


class StructOptTrainer(Trainer):
    """``Trainer`` that understands ``{"optimizer": {"type": "AdaDiag++", ...}}`` in its DeepSpeed JSON."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._structopt: Optional[tuple[Any, dict[str, Any], DistributedOptions]] = None
        hf_config = getattr(self.args, "hf_deepspeed_config", None)
        config = getattr(hf_config, "config", None)
        if not isinstance(config, dict):
            return
        if (config.get("optimizer") or {}).get("type") not in OPTIMIZERS:
            return
        parsed = parse_config(config)  # one-line error naming a bad option, before anything starts
        config.clear()  # the same dict accelerate's DeepSpeed plugin reads: now without our blocks
        config.update(parsed.ds_config)
        self._structopt = (parsed.optimizer_cls, parsed.options, parsed.dist_options)

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        if self._structopt is None:
            return super().create_optimizer(model)
        if self.optimizer is None:
            from ..distributed.optimizer import DistributedStructuredOptimizer
            from ..grouping import param_groups

            cls, options, dist_options = self._structopt
            self.optimizer = DistributedStructuredOptimizer(
                param_groups(model if model is not None else self.model), cls, options,
                dist_options=dist_options)
        return self.optimizer

    def __setattr__(self, name: str, value: Any) -> None:
        """Trainer sets ``self.deepspeed`` to the new engine just before ``resume_from_checkpoint``
        makes it load a checkpoint: our checkpoint code must be attached by then, or our bases,
        moments and fp32 masters would restart from zero."""
        super().__setattr__(name, value)
        if name == "deepspeed" and value is not None and getattr(self, "_structopt", None) is not None:
            from .deepspeed import attach_engine

            attach_engine(value)  # ZeRO-3 layouts, our checkpoint files, metrics (once per engine)
