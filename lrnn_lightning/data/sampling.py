"""`EpochShuffle`: training order that depends only on (seed, epoch), so a resumed run sees the same batches.

A plain `shuffle=True` draws each epoch's order from the global random state, which a
checkpoint does not hold: a run resumed at epoch 3 would then train on other batches
than the uninterrupted run did. Lightning calls `set_epoch` on the sampler at the start of
every epoch (also after a resume), and under DDP replaces a `RandomSampler` by a
`DistributedSampler`, which is seeded by epoch as well, but from the run's `seed`
(PL_GLOBAL_SEED), not from `shuffle_seed`: with several processes `shuffle_seed` has no effect.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import RandomSampler


class EpochShuffle(RandomSampler):
    """A permutation of the dataset per epoch, drawn from the pair (seed, epoch) (not from seed + epoch, under
    which seed 0's second epoch would repeat seed 1's first).

    Args:
        data_source: the dataset.
        seed: the shuffle seed.

    Example:
        >>> sampler = EpochShuffle(range(5), seed=0)
        >>> sampler.set_epoch(3)
        >>> list(sampler) == list(sampler)   # the same order whenever epoch 3 is replayed
        True
    """

    def __init__(self, data_source: Sized, seed: int):
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        mixed = np.random.SeedSequence([self.seed % 2**63, self.epoch]).generate_state(2, np.uint64)
        generator = torch.Generator().manual_seed(int(mixed[0]) % 2**63)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()
