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
    # the DeepSpeed JSON "optimizer" block's type and fixed params (lr, update_freq added per run), for
    # runs through the training entry point (regime --launcher); None: no DeepSpeed config type exists
    ds_optimizer: Optional[tuple[str, dict[str, Any]]] = None

    def default_lr(self) -> float:
        return self.lrs[len(self.lrs) // 2]


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


def ours(label: str, lrs: tuple[float, ...], cls_name: str, **fixed: Any) -> Contender:
    """One of our optimizers (config name ``cls_name``) with ``fixed`` options, in-process and as a
    DeepSpeed config block alike."""
    return Contender(label, lrs, _ours(cls_name, **fixed), ours=True, ds_optimizer=(cls_name, dict(fixed)))


def paper(label: str, lrs: tuple[float, ...], **change: Any) -> Contender:
    """AdaDiag++ as the paper reads (``preset="paper"``) with ``change`` applied."""
    return ours(label, lrs, "AdaDiag++", preset="paper", **change)


def adamw(label: str, lrs: tuple[float, ...], beta2: float) -> Contender:
    def build(params: list[nn.Parameter], lr: float, _: int) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), weight_decay=0.0, foreach=True)
    return Contender(label, lrs, build, ds_optimizer=("AdamW", {"betas": [0.9, beta2], "eps": 1e-8, "weight_decay": 0.0}))


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
    adamw("AdamW", (5e-4, 1e-3, 2e-3), 0.999),
    Contender("Adafactor", (1e-2, 2e-2, 4e-2), _adafactor),
    ours("AdaDiag", (1e-3, 2e-3, 4e-3), "AdaDiag"),
    ours("AdaDiag++", (1e-3, 2e-3, 4e-3), "AdaDiag++"),
    ours("AdaDiag++ factored", (1e-3, 2e-3, 4e-3), "AdaDiag++", factored=True),
    ours("ASGO", (5e-3, 1e-2, 2e-2), "ASGO"),
    ours("DASGO", (5e-3, 1e-2, 2e-2), "DASGO"),
    Contender("SOAP", (1e-3, 2e-3, 4e-3), _soap),
    Contender("Muon", (1e-2, 2e-2, 4e-2), _muon),
]}


# Variants for investigating a result (``--optimizers "AdaDiag++ reproject" ...``); not run by default.
VARIANTS: dict[str, Contender] = {c.name: c for c in [
    paper("AdaDiag++ reproject", (1e-3, 2e-3, 4e-3), moments="reproject"),
    paper("AdaDiag++ ema", (1e-3, 2e-3, 4e-3), basis="ema"),
    ours("AdaDiag++ T=5", (1e-3, 2e-3, 4e-3), "AdaDiag++", update_freq=5),
    ours("AdaDiag reproject", (1e-3, 2e-3, 4e-3), "AdaDiag", moments="reproject"),
    ours("AdaDiag++ staggered", (1e-3, 2e-3, 4e-3), "AdaDiag++", stagger_refresh=True),
    ours("AdaDiag++ staggered+ahead", (1e-3, 2e-3, 4e-3), "AdaDiag++", stagger_refresh=True, refresh_from="previous"),
    adamw("AdamW low", (1.25e-4, 2.5e-4, 5e-4), 0.999),
    # issue 15's ablation: one change at a time from the paper's reading (preset="paper", pinned
    # so a later default change does not change what these names mean)
    paper("AdaDiag++ reproject_both", (1e-3, 2e-3, 4e-3), moments="reproject_both"),
    paper("AdaDiag++ reset", (1e-3, 2e-3, 4e-3), moments="reset"),
    paper("AdaDiag++ momentum basis", (1e-3, 2e-3, 4e-3), basis="momentum", moments="reproject"),
    paper("AdaDiag++ small_side", (1e-3, 2e-3, 4e-3), nonsquare="small_side"),
    paper("AdaDiag++ b2=0.95", (1e-3, 2e-3, 4e-3), betas=(0.9, 0.95)),
    paper("AdaDiag++ b2=0.99", (1e-3, 2e-3, 4e-3), betas=(0.9, 0.99)),
    paper("AdaDiag++ ema+reproject", (1e-3, 2e-3, 4e-3), basis="ema", moments="reproject"),
    # Adafactor mode without momentum: matrix state beyond the rotations is the factored V only
    ours("AdaDiag++ factored b1=0", (1e-3, 2e-3, 4e-3), "AdaDiag++", factored=True, betas=(0.0, 0.999)),
]}


# The paper-regime suite (bench/regime.py): both AdamW settings (the better one sets the target),
# SOAP at our refresh period. Grids are starting points: the suite extends each one past an edge optimum.
REGIME: dict[str, Contender] = {c.name: c for c in [
    adamw("AdamW", (1e-3, 2e-3, 4e-3), 0.999),
    adamw("AdamW b2=0.95", (1e-3, 2e-3, 4e-3), 0.95),
    Contender("Adafactor", (1e-2, 2e-2, 4e-2), _adafactor),
    Contender("SOAP", (2e-3, 4e-3, 8e-3), _soap_same_period),
    Contender("Muon", (1e-2, 2e-2, 4e-2), _muon),
    ours("AdaDiag", (1e-3, 2e-3, 4e-3), "AdaDiag"),
    ours("AdaDiag++", (1e-3, 2e-3, 4e-3), "AdaDiag++"),
    paper("AdaDiag++ paper", (1e-3, 2e-3, 4e-3)),
    ours("AdaDiag++ factored", (1e-3, 2e-3, 4e-3), "AdaDiag++", factored=True),
    ours("ASGO", (5e-3, 1e-2, 2e-2), "ASGO"),
    ours("DASGO", (5e-3, 1e-2, 2e-2), "DASGO"),
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

        # "step": a counter some optimizers keep in their groups (pytorch-optimizer's Muon), not an option
        skip = {"params", "param_names", "lr", "base_lr", "initial_lr", "step"}
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
