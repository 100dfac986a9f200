"""Single-process optimizer math. Imports torch only (never DeepSpeed): integrations import this."""
from .adadiag import AdaDiag, AdaDiagPP
from .asgo import ASGO, DASGO
from .base import StructuredOptimizer

__all__ = ["AdaDiag", "AdaDiagPP", "ASGO", "DASGO", "StructuredOptimizer"]
