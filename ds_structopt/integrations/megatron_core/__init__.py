"""Megatron-core integration: our optimizers behind megatron's optimizer interface (see builder.py)."""
from .builder import get_megatron_structopt_optimizer, parameter_names
from .checkpoint import load_checkpoint, save_checkpoint

__all__ = ["get_megatron_structopt_optimizer", "parameter_names", "save_checkpoint", "load_checkpoint"]
