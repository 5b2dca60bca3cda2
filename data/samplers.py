# --------------------------------------------------------
# Focal Transformer: deterministic, resumable sampling
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Samplers whose output depends only on the seed, the epoch and the rank.

The training sampler yields ``(epoch, index)`` pairs; ``SeededSamples`` turns each pair into
the sample at ``index`` augmented with random number generators seeded from
``(seed, epoch, index)``. The augmentation of a sample therefore does not depend on the number
of DataLoader workers, on which worker loads it, or on where in the epoch loading started.
"""
import contextlib
import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def derive_seed(*values):
    """A 63-bit seed mixed from non-negative integers (numpy's SeedSequence)."""
    low, high = np.random.SeedSequence(list(values)).generate_state(2)
    return (int(high) << 32 | int(low)) & (2 ** 63 - 1)


@contextlib.contextmanager
def seeded_rngs(seed):
    """Seed python's ``random``, numpy's global generator and torch's CPU generator (the ones
    timm and torchvision transforms draw from), and give back their earlier states afterwards,
    so that loading in the main process (NUM_WORKERS=0) leaves its random streams untouched."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: sample ``index`` with its randomness seeded
    from ``(seed, epoch, index)``."""

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, epoch_and_index):
        epoch, index = epoch_and_index
        with seeded_rngs(derive_seed(self.seed, epoch, index)):
            return self.dataset[index]


class ResumableDistributedSampler(Sampler):
    """The training order: a permutation of the dataset drawn from ``(seed, epoch)``, split
    across ``num_replicas`` processes (every process gets ``ceil(N / num_replicas)`` indices,
    the last ones repeating the first as torch's DistributedSampler does), yielding
    ``(epoch, index)`` pairs for ``SeededSamples``.

    ``shard_first=True`` gives each process the fixed shard ``rank::num_replicas`` and shuffles
    only within it (for a per-process image cache). ``steps_per_epoch`` > 0 makes an epoch that
    many batches per process instead (iteration schedules): the permutations of passes 0, 1, ...
    (pass 0 the one above, pass k drawn from ``(seed, epoch, k)``) are chained to the length
    needed. ``set_epoch(epoch, start_step)`` selects the epoch and skips its first ``start_step``
    batches of ``batch_size`` without loading them; ``len()`` stays the full epoch.
    """

    def __init__(self, dataset_size, batch_size, num_replicas=1, rank=0, seed=0, shard_first=False,
                 steps_per_epoch=0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shard_first = shard_first
        self.steps_per_epoch = steps_per_epoch
        self.num_samples = (steps_per_epoch * batch_size if steps_per_epoch > 0
                            else math.ceil(dataset_size / num_replicas))
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch = epoch
        self.start_step = start_step

    def epoch_indices(self):
        """This process's indices for the whole current epoch, in order."""
        if self.shard_first:
            shard = torch.arange(self.rank, self.dataset_size, self.num_replicas)
            order = self._passes(len(shard), self.num_samples)
            return shard[order].tolist()
        order = self._passes(self.dataset_size, self.num_samples * self.num_replicas)
        return order[self.rank::self.num_replicas].tolist()

    def _passes(self, size, length):
        """`length` indices into range(size): the epoch's first permutation, repeated to the
        length, or, when the length needs more than one pass, a fresh permutation per pass."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(size, generator=generator)
        if length <= size or self.steps_per_epoch <= 0:
            return _repeat_to_length(order, length)
        passes = [order] + [torch.randperm(size, generator=torch.Generator().manual_seed(
            derive_seed(self.seed, self.epoch, k))) for k in range(1, math.ceil(length / size))]
        return torch.cat(passes)[:length]

    def __iter__(self):
        indices = self.epoch_indices()[self.start_step * self.batch_size:]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self):
        return self.num_samples


def _repeat_to_length(indices, length):
    repeats = math.ceil(length / max(len(indices), 1))
    return indices.repeat(repeats)[:length]


class ShardSampler(Sampler):
    """The evaluation order: process ``rank`` reads indices ``rank, rank + num_replicas, ...``,
    so that every sample is read exactly once over all processes, without padding."""

    def __init__(self, dataset_size, num_replicas=1, rank=0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.indices = range(rank, dataset_size, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
