"""Batch order: a seeded permutation per epoch, split across processes, resumable at any batch.

Global batch ``b`` of an epoch is ``permutation[b * G : (b + 1) * G]`` with ``G = batch_size * world_size``; process
``r`` takes its ``r``-th slice of ``batch_size`` images. So N processes with batch B see, together, exactly the
batches one process with batch N*B sees, and a run resumed at batch ``b`` continues where it stopped. The last
incomplete global batch of an epoch is dropped (as in the paper code), so every process does the same number of
steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def epoch_permutation(dataset_size: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: depends on (seed, epoch) only, never on global random state."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5A3])).permutation(dataset_size)


def batches_per_epoch(dataset_size: int, batch_size: int, world_size: int) -> int:
    return dataset_size // (batch_size * world_size)


class ResumableBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Yields this process's batches of ``(epoch, index)`` keys for one epoch, from batch ``start_batch`` on."""

    def __init__(
        self,
        *,
        dataset_size: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        stop_batch: int | None = None,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler setup: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        total = batches_per_epoch(dataset_size, batch_size, world_size)
        if total == 0:
            raise ValueError(
                f"the training split has {dataset_size} images, fewer than one global batch of "
                f"{batch_size} x {world_size} processes; lower --batch-size"
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.stop_batch = total if stop_batch is None else min(stop_batch, total)

    def __len__(self) -> int:
        return max(0, self.stop_batch - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_permutation(self.dataset_size, self.seed, self.epoch)
        global_batch = self.batch_size * self.world_size
        for batch in range(self.start_batch, self.stop_batch):
            first = batch * global_batch + self.rank * self.batch_size
            yield [(self.epoch, int(index)) for index in order[first : first + self.batch_size]]


def shard_indices(count: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard of this process: every ``world_size``-th image, no padding, no repeats."""
    return list(range(rank, count, world_size))
