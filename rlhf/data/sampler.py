"""Deterministic, resumable batches: the position in the data is a function of the step alone."""

from __future__ import annotations

import torch


class ShuffledBatches:
    """Epoch-wise shuffled global batches, split across ranks.

    Micro-step m takes the m-th slice of `world_size * batch_size` indices from a permutation
    seeded by (seed, epoch); each rank takes its own `batch_size` part. Because nothing but `m`
    decides the batch, a resumed run restores its data position from the step counter alone,
    and every rank can see the other ranks' batches (to count global tokens without a collective).
    """

    def __init__(self, num_rows: int, *, batch_size: int, world_size: int, seed: int) -> None:
        global_batch = batch_size * world_size
        if num_rows < global_batch:
            raise ValueError(f"{num_rows} rows cannot fill one global batch of {global_batch}")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.steps_per_epoch = num_rows // global_batch  # the ragged tail is left out each epoch
        self._epoch = -1
        self._perm: list[int] = []

    def global_batch(self, micro_step: int) -> list[list[int]]:
        """Row indices of micro-step `micro_step`, one list per rank."""
        epoch, within = divmod(micro_step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_rows, generator=generator).tolist()
            self._epoch = epoch
        start = within * self.batch_size * self.world_size
        return [
            self._perm[start + r * self.batch_size : start + (r + 1) * self.batch_size]
            for r in range(self.world_size)
        ]
