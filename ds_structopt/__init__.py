"""ds_structopt: structured adaptive optimizers (AdaDiag, AdaDiag++, ASGO, DASGO) for large-scale training."""
from __future__ import annotations

from typing import Any

from .grouping import param_groups
from .optim import ASGO, DASGO, OPTIMIZERS, AdaDiag, AdaDiagPP, StructuredOptimizer, get_optimizer_class

__version__ = "0.1.0"


def initialize(*args: Any, **kwargs: Any):
    """``deepspeed.initialize`` with our optimizers in the JSON config (see integrations/deepspeed.py)."""
    from .integrations.deepspeed import initialize as _initialize

    return _initialize(*args, **kwargs)


def zero_init(config: Any, **kwargs: Any):
    """``deepspeed.zero.Init`` for a config that names one of our optimizers (ZeRO-3 model construction)."""
    import deepspeed

    from .integrations.deepspeed_config import parse_config
    from .integrations.deepspeed_ops import skip_unused_jit_ops

    parsed = parse_config(config)
    skip_unused_jit_ops()  # zero.Init may be the first thing that starts DeepSpeed's comm backend
    return deepspeed.zero.Init(config_dict_or_path=parsed.ds_config, **kwargs)


def metrics(engine: Any) -> dict[str, float]:
    """Per-rank optimizer metrics of an engine from :func:`initialize` (state bytes, refreshes, failures, comm bytes)."""
    from .integrations.deepspeed import metrics as _metrics

    return _metrics(engine)


def distributed_optimizer(model: Any, optimizer: str = "AdaDiag++", process_group: Any = None, **kwargs: Any):
    """Our ownership-partitioned optimizer for a DDP- or FSDP2-wrapped model, no DeepSpeed
    (see integrations/torch_parallel.py)."""
    from .integrations.torch_parallel import distributed_optimizer as _distributed_optimizer

    return _distributed_optimizer(model, optimizer, process_group, **kwargs)


def build(name: str, params: Any, **options: Any) -> StructuredOptimizer:
    """Construct the optimizer called ``name`` in configs."""
    return get_optimizer_class(name)(params, **options)


__all__ = ["AdaDiag", "AdaDiagPP", "ASGO", "DASGO", "StructuredOptimizer", "OPTIMIZERS", "param_groups", "get_optimizer_class", "build", "distributed_optimizer", "initialize", "metrics", "zero_init"]
