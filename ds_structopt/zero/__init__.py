"""ZeRO-aware distribution of the structured optimizers: ownership plan and the DeepSpeed-facing optimizer.

May import ``ds_structopt.optim`` and torch.distributed; never DeepSpeed itself
(it only reads the ``_hp_mapping`` attributes DeepSpeed puts on parameters).
"""
from .optimizer import DistributedStructuredOptimizer
from .ownership import MatrixInfo, plan_owners

__all__ = ["DistributedStructuredOptimizer", "MatrixInfo", "plan_owners"]
