"""The optimizers a benchmark compares, all built the same way.

Every contender gets the same parameter split (``ds_structopt.param_groups``):
attention/MLP matrices go to the contender, embeddings, LM head, norms and
biases to one torch AdamW whose settings are the same for everybody (so the
comparison is about the matrix update only). Each has a small lr grid of the
same length; the convergence suite sweeps it and keeps the best.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import ds_structopt as dso

PEER_LIBRARY = "pytorch-optimizer"  # SOAP and Muon; version pinned in constraints.txt


@dataclass(frozen=True)
class Contender:
    name: str
    lrs: tuple[float, ...]            # the sweep (same length for every contender)
    build: Callable[[list[nn.Parameter], float, int], torch.optim.Optimizer]  # (matrices, lr, update_freq)
    ours: bool = False

    def default_lr(self) -> float:
        return self.lrs[len(self.lrs) // 2]


def _adamw(params: list[nn.Parameter], lr: float, _: int) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, foreach=True)


def _adamw_095(params: list[nn.Parameter], lr: float, _: int) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)


def _adafactor(params: list[nn.Parameter], lr: float, _: int) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(params, lr=lr, weight_decay=0.0, foreach=True)


def _ours(name: str, **fixed: Any) -> Callable[[list[nn.Parameter], float, int], torch.optim.Optimizer]:
    def build(params: list[nn.Parameter], lr: float, update_freq: int) -> torch.optim.Optimizer:
        cls = dso.get_optimizer_class(name)
        opts: dict[str, Any] = {"lr": lr}
        if "update_freq" in cls.DEFAULTS:
            opts["update_freq"] = update_freq
        if "weight_decay" in cls.DEFAULTS:
            opts["weight_decay"] = 0.0
        opts.update(fixed)  # a variant's own options win (e.g. its own update_freq)
        return cls([{"params": params, "structured": True}], **opts)
    return build


def _paper(**change: Any) -> Callable[[list[nn.Parameter], float, int], torch.optim.Optimizer]:
    """AdaDiag++ as the paper reads (``preset="paper"``) with ``change`` applied."""
    return _ours("AdaDiag++", preset="paper", **change)


def _soap(params: list[nn.Parameter], lr: float, update_freq: int) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(params, lr=lr, betas=(0.95, 0.95), weight_decay=0.0, precondition_frequency=10)


def _soap_same_period(params: list[nn.Parameter], lr: float, update_freq: int) -> torch.optim.Optimizer:
    """SOAP refreshing its eigenbases every ``update_freq`` steps, as ours do (the regime suite)."""
    from pytorch_optimizer import SOAP

    return SOAP(params, lr=lr, betas=(0.95, 0.95), weight_decay=0.0, precondition_frequency=update_freq)


def _muon(params: list[nn.Parameter], lr: float, _: int) -> torch.optim.Optimizer:
    from pytorch_optimizer import Muon

    return Muon([{"params": params, "use_muon": True}], lr=lr, momentum=0.95, weight_decay=0.0)


CONTENDERS: dict[str, Contender] = {c.name: c for c in [
    Contender("AdamW", (5e-4, 1e-3, 2e-3), _adamw),
    Contender("Adafactor", (1e-2, 2e-2, 4e-2), _adafactor),
    Contender("AdaDiag", (1e-3, 2e-3, 4e-3), _ours("AdaDiag"), ours=True),
    Contender("AdaDiag++", (1e-3, 2e-3, 4e-3), _ours("AdaDiag++"), ours=True),
    Contender("AdaDiag++ factored", (1e-3, 2e-3, 4e-3), _ours("AdaDiag++", factored=True), ours=True),
    Contender("ASGO", (5e-3, 1e-2, 2e-2), _ours("ASGO"), ours=True),
    Contender("DASGO", (5e-3, 1e-2, 2e-2), _ours("DASGO"), ours=True),
    Contender("SOAP", (1e-3, 2e-3, 4e-3), _soap),
    Contender("Muon", (1e-2, 2e-2, 4e-2), _muon),
]}


# Variants for investigating a result (``--optimizers "AdaDiag++ reproject" ...``); not run by default.
VARIANTS: dict[str, Contender] = {c.name: c for c in [
    Contender("AdaDiag++ reproject", (1e-3, 2e-3, 4e-3), _paper(moments="reproject"), ours=True),
    Contender("AdaDiag++ ema", (1e-3, 2e-3, 4e-3), _paper(basis="ema"), ours=True),
    Contender("AdaDiag++ T=5", (1e-3, 2e-3, 4e-3), _ours("AdaDiag++", update_freq=5), ours=True),
    Contender("AdaDiag reproject", (1e-3, 2e-3, 4e-3), _ours("AdaDiag", moments="reproject"), ours=True),
    Contender("AdaDiag++ staggered", (1e-3, 2e-3, 4e-3), _ours("AdaDiag++", stagger_refresh=True), ours=True),
    Contender("AdaDiag++ staggered+ahead", (1e-3, 2e-3, 4e-3),
              _ours("AdaDiag++", stagger_refresh=True, refresh_from="previous"), ours=True),
    Contender("AdamW low", (1.25e-4, 2.5e-4, 5e-4), _adamw),
    # issue 15's ablation: one change at a time from the paper's reading (preset="paper", pinned
    # so a later default change does not change what these names mean)
    Contender("AdaDiag++ reproject_both", (1e-3, 2e-3, 4e-3), _paper(moments="reproject_both"), ours=True),
    Contender("AdaDiag++ reset", (1e-3, 2e-3, 4e-3), _paper(moments="reset"), ours=True),
    Contender("AdaDiag++ momentum basis", (1e-3, 2e-3, 4e-3), _paper(basis="momentum", moments="reproject"), ours=True),
    Contender("AdaDiag++ small_side", (1e-3, 2e-3, 4e-3), _paper(nonsquare="small_side"), ours=True),
    Contender("AdaDiag++ b2=0.95", (1e-3, 2e-3, 4e-3), _paper(betas=(0.9, 0.95)), ours=True),
    Contender("AdaDiag++ b2=0.99", (1e-3, 2e-3, 4e-3), _paper(betas=(0.9, 0.99)), ours=True),
    Contender("AdaDiag++ ema+reproject", (1e-3, 2e-3, 4e-3), _paper(basis="ema", moments="reproject"), ours=True),
]}


# The paper-regime suite (bench/regime.py): both AdamW settings (the better one sets the target),
# SOAP at our refresh period. Grids are starting points: the suite extends each one past an edge optimum.
REGIME: dict[str, Contender] = {c.name: c for c in [
    Contender("AdamW", (1e-3, 2e-3, 4e-3), _adamw),
    Contender("AdamW b2=0.95", (1e-3, 2e-3, 4e-3), _adamw_095),
    Contender("Adafactor", (1e-2, 2e-2, 4e-2), _adafactor),
    Contender("SOAP", (2e-3, 4e-3, 8e-3), _soap_same_period),
    Contender("Muon", (1e-2, 2e-2, 4e-2), _muon),
    Contender("AdaDiag", (1e-3, 2e-3, 4e-3), _ours("AdaDiag"), ours=True),
    Contender("AdaDiag++", (1e-3, 2e-3, 4e-3), _ours("AdaDiag++"), ours=True),
    Contender("AdaDiag++ paper", (1e-3, 2e-3, 4e-3), _paper(), ours=True),
    Contender("AdaDiag++ factored", (1e-3, 2e-3, 4e-3), _ours("AdaDiag++", factored=True), ours=True),
    Contender("ASGO", (5e-3, 1e-2, 2e-2), _ours("ASGO"), ours=True),
    Contender("DASGO", (5e-3, 1e-2, 2e-2), _ours("DASGO"), ours=True),
]}


class PairedOptimizer(torch.optim.Optimizer):
    """The contender on the matrices plus the shared AdamW on everything else, stepped together.

    Exposes both optimizers' param groups (each with ``base_lr``) so one LR schedule
    scales them all.
    """

    def __init__(self, matrix_opt: torch.optim.Optimizer, elementwise_opt: Optional[torch.optim.Optimizer]):
        self.parts = [o for o in (matrix_opt, elementwise_opt) if o is not None]
        self.param_groups = [g for o in self.parts for g in o.param_groups]
        for g in self.param_groups:
            g.setdefault("base_lr", g["lr"])
        self.defaults, self.state = {}, {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for o in self.parts:
            o.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def options(self) -> str:
        """Every hyperparameter of the contender's matrix groups but the lr (and which class), as
        sorted JSON: a cached run is reused only while this is unchanged (e.g. not after a default
        changes)."""
        import json

        skip = {"params", "param_names", "lr", "base_lr", "initial_lr"}
        matrix = self.parts[0]
        groups = [{k: v for k, v in g.items() if k not in skip} for g in matrix.param_groups]
        return json.dumps({"class": f"{type(matrix).__module__}.{type(matrix).__qualname__}", "groups": groups},
                          sort_keys=True, default=repr)

    def state_bytes(self) -> int:
        total = 0
        for o in self.parts:
            for st in o.state.values():
                total += sum(v.numel() * v.element_size() for v in _tensors(st))
        return total

    def matrix_part(self) -> torch.optim.Optimizer:
        return self.parts[0]


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[dict[str, Any]]]:
    """(matrices, elementwise param groups) with the package's default name split."""
    matrices, elementwise = [], []
    for g in dso.param_groups(model):
        if g.get("structured", False):
            matrices.extend(g["params"])
        else:
            elementwise.append({"params": g["params"], "weight_decay": g.get("weight_decay", 0.0)})
    return matrices, elementwise


def build(name: str | Contender, model: nn.Module, lr: Optional[float] = None, *, update_freq: int = 100,
          elementwise_lr: float = 1e-3) -> PairedOptimizer:
    """``name`` from CONTENDERS/VARIANTS (or a Contender itself) at ``lr`` (default: the middle of its grid)."""
    c = name if isinstance(name, Contender) else CONTENDERS.get(name) or VARIANTS.get(name)
    if c is None:
        raise ValueError(f"unknown optimizer '{name}'; choose from {sorted(CONTENDERS) + sorted(VARIANTS)}")
    matrices, elementwise = split_params(model)
    matrix_opt = c.build(matrices, c.default_lr() if lr is None else lr, update_freq)
    elem_opt = torch.optim.AdamW(elementwise, lr=elementwise_lr, betas=(0.9, 0.999), foreach=True) \
        if any(g["params"] for g in elementwise) else None
    return PairedOptimizer(matrix_opt, elem_opt)


def names(selection: Optional[Sequence[str]] = None) -> list[str]:
    if not selection:
        return list(CONTENDERS)
    unknown = [n for n in selection if n not in CONTENDERS and n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {unknown}; choose from {sorted(CONTENDERS) + sorted(VARIANTS)}")
    return list(selection)
