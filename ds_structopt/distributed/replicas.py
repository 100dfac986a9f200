"""Replica groups for hierarchical ownership: node-sized groups of ranks, each with its own owners.

With ``ownership_group_size = G`` the data-parallel ranks split into world/G
groups of G consecutive ranks (one node, with launchers that number ranks node
by node). Every group owns every matrix once: owners compute identical updates
from identical full gradients, and return them only inside their group, so
the update return never crosses a node (as Distributed Shampoo's
trainers-per-group). The price: each rank keeps the state of 1/G of the
matrices instead of 1/world, and a matrix's gradient pieces held outside a
group must still reach that group's owner.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..comm import comm_device


class ReplicaGroups:
    """Which replica group this rank is in, and that group's process group (None = the whole group)."""

    def __init__(self, world: int, group_size: Optional[int], parent: Optional[dist.ProcessGroup] = None,
                 device: Optional[torch.device] = None) -> None:
        size = world if group_size is None else group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
            raise ValueError(f"ownership_group_size must divide the data-parallel world size {world}, got {group_size!r}")
        self.size, self.count = size, world // size
        rank = dist.get_rank(parent) if dist.is_initialized() else 0
        self.index = rank // size
        self.group: Optional[dist.ProcessGroup] = parent
        if self.count > 1:
            # every rank creates every subgroup, in the same order (torch requires it)
            for k in range(self.count):
                members = [_global(parent, r) for r in range(k * size, (k + 1) * size)]
                pg = dist.new_group(members)
                if k == self.index:
                    self.group = pg
            # NCCL creates a group's communicator on its first use, with every member taking part;
            # our first use is a point-to-point batch that members without messages skip (a hang),
            # so every member makes one tiny collective on its group now.
            dist.all_reduce(torch.zeros(1, device=comm_device(self.group, device)), group=self.group)

    def members(self, k: Optional[int] = None) -> range:
        """Ranks (in the parent group) of replica group ``k`` (default: this rank's)."""
        k = self.index if k is None else k
        return range(k * self.size, (k + 1) * self.size)


def _global(parent: Optional[dist.ProcessGroup], rank: int) -> int:
    return dist.get_global_rank(parent, rank) if parent is not None else rank
