"""Training sample order that can be resumed exactly, and per-sample augmentation seeds.

The order of an epoch is a pure function of (seed, epoch); each rank takes a strided shard of it;
each sample carries its own seed, derived from (seed, epoch, index), and the dataset wrapper seeds
the worker's RNGs with it before building the sample. So a sample's augmentation does not depend on
which worker builds it or on what that worker did before, and a run resumed in the middle of an
epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_MASK63 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0]) & _MASK63


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled (or ordered) indices of one rank's shard, yielding `(index, sample_seed)`.

    Pads the epoch with repeated indices so that every rank gets the same number of samples (for
    training only: evaluation shards without padding). `start` skips the first samples of the
    epoch on this rank, to resume mid-epoch.
    """

    def __init__(self, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("the training split is empty")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.per_rank = -(-num_samples // world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]
        for index in order[self.rank : total : self.world_size][self.start :]:
            yield index, sample_seed(self.seed, self.epoch, index)


def seed_sample(seed: int) -> None:
    """Seed this process's python, numpy and torch RNGs for one sample, as `torch.manual_seed` does, cheaply.

    `torch.manual_seed` also seeds every accelerator's generators, and where one is not initialised
    (every loader worker; a CPU run) it queues that for later with a formatted copy of the call stack:
    about 50 microseconds a sample, more than the rest of building a sample of cached tokens, and
    a fifth of a training step on them. CUDA, where it is initialised in this process (the main
    process of a CUDA run without loader workers), is seeded as `torch.manual_seed` seeds it; the
    trainer runs on no other accelerator.
    """
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class SeededDataset(Dataset):
    """Seeds python/numpy/torch RNGs from the sample seed, then builds the sample."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        seed_sample(seed)
        return self.dataset[index]
