"""Splitting the rollout subset over processes (DDP) and bringing the pieces back together.

Every process rolls out one contiguous block of the subset on its own device. Blocks have
the same size on every process, ceil(N / world_size), so that collectives see equal
shapes and every process captures a graph of the same batch size; the blocks at the end
are padded by repeating the subset's last window, and padded rows are counted with
weight zero. Gathering the blocks in rank order and keeping the first N rows gives the
subset back in its own order.

    subset of N = 5 windows, 2 processes:   rank 0 -> [0, 1, 2]    rank 1 -> [3, 4, 4*]   (* weight 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor


@dataclass(frozen=True)
class Shard:
    """The positions (into the subset) that one process rolls out.

    Attributes:
        positions: ceil(N / world_size) positions; the first `real` are this process's own,
            the rest repeat the subset's last position as padding.
        real: how many positions count.
    """

    positions: list[int]
    real: int

    @property
    def weight(self) -> Tensor:
        """(len(positions),) float64: 1 for counted rows, 0 for padding."""
        return (torch.arange(len(self.positions)) < self.real).double()


def shard(count: int, world_size: int, rank: int) -> Shard:
    """Process `rank`'s block of a subset of `count` windows.

    Example:
        >>> shard(5, 2, 1)
        Shard(positions=[3, 4, 4], real=2)
    """
    if count < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: need count >= 1 and 0 <= rank < world_size, got count={count}, "
                         f"world_size={world_size}, rank={rank}.")
    size = -(-count // world_size)
    start = min(rank * size, count)
    stop = min(start + size, count)
    own = list(range(start, stop))
    return Shard(positions=own + [count - 1] * (size - len(own)), real=len(own))


def sum_over_processes(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """Element-wise sum of `tensor` over all processes (itself with one process); returned on the CPU."""
    if trainer.world_size == 1:
        return tensor.clone()
    # a copy (the reduction is in place), on the process's own device (NCCL reduces only GPU tensors)
    device_copy = tensor.to(trainer.strategy.root_device, copy=True)
    return trainer.strategy.reduce(device_copy, reduce_op="sum").cpu()


def gather_rows(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """Every process's `tensor` (S, ...) concatenated in rank order: (world_size * S, ...) on the CPU."""
    if trainer.world_size == 1:
        return tensor.clone()
    gathered = trainer.strategy.all_gather(tensor.to(trainer.strategy.root_device))
    return gathered.reshape(-1, *tensor.shape[1:]).cpu()
