"""Single-process optimizer math. Imports torch only (never DeepSpeed): integrations import this.

A family is one module here that defines a ``StructuredOptimizer`` subclass decorated with
``@register``, plus its import below (README.md in this folder: the interface and the recipe)."""
from .adadiag import AdaDiag, AdaDiagPP
from .asgo import ASGO, DASGO
from .base import StructuredOptimizer
from .registry import OPTIMIZERS, get_optimizer_class, register

__all__ = ["AdaDiag", "AdaDiagPP", "ASGO", "DASGO", "StructuredOptimizer", "OPTIMIZERS", "get_optimizer_class",
           "register"]
