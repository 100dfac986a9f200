"""Config names -> optimizer families. A family registers itself with ``@register`` in its own
file; ``optim/__init__.py`` imports that file. Everything that lists families (configs, the
DeepSpeed/Megatron/HF integrations, ``ds-structopt check``, the demo, tests) reads this dict."""
from __future__ import annotations

from typing import TypeVar

from .base import StructuredOptimizer

#: Names accepted in configs (e.g. a DeepSpeed JSON "optimizer.type") -> class.
OPTIMIZERS: dict[str, type[StructuredOptimizer]] = {}

F = TypeVar("F", bound=type[StructuredOptimizer])


def register(cls: F) -> F:
    """Make ``cls`` available under its config name ``cls.NAME``."""
    if cls.NAME in OPTIMIZERS and OPTIMIZERS[cls.NAME] is not cls:
        raise ValueError(f"optimizer name {cls.NAME!r} is registered twice ({OPTIMIZERS[cls.NAME].__name__}, {cls.__name__})")
    OPTIMIZERS[cls.NAME] = cls
    return cls


def get_optimizer_class(name: str) -> type[StructuredOptimizer]:
    """Look up an optimizer by its config name; a clear error lists the valid ones."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer type '{name}'; expected one of {sorted(OPTIMIZERS)}") from None
