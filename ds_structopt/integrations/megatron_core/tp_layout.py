"""How a tensor-parallel shard sits inside its full matrix (for the "gather" mode).

Megatron splits column-parallel weights along dim 0 and row-parallel ones along
dim 1; concatenating the shards in TP-rank order gives the TP=1 matrix, except
for a gated MLP's ``linear_fc1`` whose every shard is ``[gate_t; up_t]``: there the
TP=1 matrix is ``[gate_0 .. gate_{T-1}; up_0 .. up_{T-1}]``. Getting this exactly
right matters: a structured preconditioner is only equivariant to row
permutations up to its arbitrary null-space completion, so "gather" rebuilds the
TP=1 layout itself, which makes it exact with respect to TP=1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardLayout:
    dim: int     # megatron's partition_dim
    size: int    # tensor-parallel world size
    rank: int    # this rank's position in the TP group
    blocks: int = 1  # stacked sub-matrices per shard (2 for a gated fc1)

    def full_shape(self, local: torch.Size) -> tuple[int, ...]:
        shape = list(local)
        shape[self.dim] *= self.size
        return tuple(shape)

    def assemble(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """TP=1 matrix from the shards of every TP rank (in rank order)."""
        if self.blocks == 1:
            return torch.cat(shards, self.dim)
        parts = [s.chunk(self.blocks, self.dim) for s in shards]
        return torch.cat([parts[t][b] for b in range(self.blocks) for t in range(self.size)], self.dim)

    def local_view(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a TP=1 matrix (inverse of :meth:`assemble`)."""
        pieces = full.chunk(self.blocks * self.size, self.dim)
        return torch.cat([pieces[b * self.size + self.rank] for b in range(self.blocks)], self.dim)

    def gather(self, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        """All-gather the shards over the TP group and assemble the TP=1 matrix."""
        local = local.contiguous()
        shards = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(shards, local, group=group)
        return self.assemble(shards)


def layout_of(param: torch.Tensor, name: str, tp_size: int, tp_rank: int, gated_fc1: bool) -> ShardLayout | None:
    """The layout of a megatron parameter, or None when it is not split across TP ranks."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return None
    dim = int(getattr(param, "partition_dim", 0))
    blocks = 2 if gated_fc1 and name.endswith("linear_fc1.weight") and dim == 0 else 1
    return ShardLayout(dim=dim, size=tp_size, rank=tp_rank, blocks=blocks)
