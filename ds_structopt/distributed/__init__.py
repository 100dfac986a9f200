"""Distribution of the structured optimizers over ranks, for every framework that shards
parameters: DeepSpeed ZeRO 0-3, DDP, FSDP2 (and ownership plans for Megatron). README.md in this
folder: the layers and one step's data flow.

May import ``ds_structopt.optim`` and torch.distributed; never DeepSpeed itself (it only reads
the ``_hp_mapping`` attributes DeepSpeed puts on parameters).
"""
from .optimizer import DistributedStructuredOptimizer
from .ownership import MatrixInfo, plan_owners

__all__ = ["DistributedStructuredOptimizer", "MatrixInfo", "plan_owners"]
