"""The parameters a run would hand DeepSpeed, from a model config alone (meta tensors: no memory).

The model is built on the ``meta`` device exactly as training builds it, split by
``param_groups`` and classified by the optimizer itself, so the planner sees the
same groups, order and matrix/elementwise split as a real engine, even for 70B.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    is_matrix: bool

    @property
    def numel(self) -> int:
        out = 1
        for s in self.shape:
            out *= s
        return out

    @property
    def rows_cols(self) -> tuple[int, int]:
        return self.shape[0], self.numel // self.shape[0]


def model_params(model: Union[str, dict[str, Any]], optimizer: str, options: dict[str, Any],
                 vocab_size: int = 32000, seq_len: int = 256) -> list[list[ParamSpec]]:
    """Param groups (as DeepSpeed receives them) of a LLaMA config name/path or a LlamaConfig dict."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..grouping import param_groups
    from ..optim.registry import get_optimizer_class
    from ..training.models import model_config

    cfg = LlamaConfig(**model) if isinstance(model, dict) else model_config(model, vocab_size, seq_len)
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    opt = get_optimizer_class(optimizer)(param_groups(net), **options)
    return [[ParamSpec(name, tuple(p.shape), opt.is_matrix(p, g)) for name, p in zip(g["param_names"], g["params"])]
            for g in opt.param_groups]
