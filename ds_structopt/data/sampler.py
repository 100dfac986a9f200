"""A deterministic, resumable, rank-sharded batch sampler.

Each epoch is a permutation of the rows seeded by (seed, epoch). Global batch k
is rows perm[k*B : (k+1)*B]; rank r takes its contiguous share. The state is two
integers (epoch, batch within epoch), so a resumed run continues exactly where it
stopped, at any world size that divides the global batch.
"""
from __future__ import annotations

from typing import Any

import torch


class ShardedBatchSampler:
    def __init__(self, num_rows: int, global_batch: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} must be a positive multiple of the world size {world_size}")
        if num_rows < global_batch:
            raise ValueError(f"{num_rows} rows cannot fill one global batch of {global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_rows, self.global_batch, self.world, self.rank, self.seed = num_rows, global_batch, world_size, rank, seed
        self.epoch, self.batch_in_epoch = 0, 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_rows, generator=gen), self.epoch
        return self._perm

    def next_indices(self) -> torch.Tensor:
        """This rank's row indices of the next global batch (advances the state)."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        start = self.batch_in_epoch * self.global_batch
        batch = self._permutation()[start : start + self.global_batch]
        self.batch_in_epoch += 1
        share = self.global_batch // self.world
        return batch[self.rank * share : (self.rank + 1) * share]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "global_batch": self.global_batch, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "global_batch", "num_rows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]}, this run has {getattr(self, key)}")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
