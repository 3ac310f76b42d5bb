"""Split steps: SPLIT programs share one row tile's step, each streaming 1/SPLIT of the weights.

A one-row program streams every weight of the model from L2 at every step, and one SM
pulls only so many bytes a microsecond: at (32, 128, 64, 4) that, not arithmetic, set the
step time (RESULTS.md). With SPLIT programs per row tile, rank r takes every SPLIT-th block
of modes, Mamba channels and MLP hidden units; what the blocks sum into (the mixer's and
the MLP's output, Mamba's selection) is exchanged through a small memory area:

    publish(partial, slot, rank)   # each rank stores its partial sum (BB, BC)
    group_barrier(sem, rank)       # all ranks have stored
    total = gather(slot)           # every rank adds the SPLIT partials, in rank order

Every rank adds in the same order, so they all hold the same bits and compute the same
residual stream (rank 0 alone writes the output). The slots alternate between two buffers,
so one barrier per exchange suffices: a rank can only overwrite a buffer after the next
barrier, which every rank reaches only after reading it.

The barrier is a counter per group whose bit 31 flips once all SPLIT ranks arrived (rank 0
adds 2^31 - (SPLIT - 1), the others 1): it resets itself, so no epoch can overflow, and
needs the counter zeroed once. Ranks spin on it, so all programs must be resident at once:
the launch is cooperative (`launch_cooperative_grid`), which makes a grid that cannot be
an error instead of a hang, and `launch.build_call` keeps the grid within the SM count.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def group_barrier(sem, rank, SPLIT: tl.constexpr):
    """Wait until every rank of the group arrived; stores before it are visible to loads after it.

    sem: *int32, the group's counter (zeroed before the first launch, self-resetting).
    """
    tl.debug_barrier()  # every thread's stores of this program happen before the release below
    arrive = tl.where(rank == 0, 2147483647 - (SPLIT - 2), 1)  # 2^31 - (SPLIT - 1), an int32 literal
    before = tl.atomic_add(sem, arrive, sem="release", scope="gpu")
    # every poll is an acquire (it also invalidates the SM's L1: CCTL.IVALL). Polling relaxed with one
    # acquire after the loop gave wrong sums on an H100: ptxas dropped the unused acquire load
    flipped = False
    while not flipped:
        now = tl.atomic_add(sem, 0, sem="acquire", scope="gpu")  # a plain ld.acquire.gpu
        flipped = (before ^ now) < 0  # bit 31 differs
    tl.debug_barrier()  # what thread 0 acquired, the whole program sees


@triton.jit
def publish(x, slot, rank, col0, BB: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    """Store this rank's partial x (BB, BC) at columns [col0, col0 + BC) of its (BB, BX) block in `slot`."""
    r = tl.arange(0, BB)
    c = tl.arange(0, BC)
    tl.store(slot + rank * (BB * BX) + r[:, None] * BX + col0 + c[None, :], x)


@triton.jit
def gather(slot, col0, SPLIT: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    """The sum over ranks 0, 1, .. SPLIT - 1 (in that order) of their published (BB, BC) partials."""
    r = tl.arange(0, BB)
    c = tl.arange(0, BC)
    cells = slot + r[:, None] * BX + col0 + c[None, :]
    total = tl.load(cells)
    for g in tl.static_range(1, SPLIT):
        total += tl.load(cells + g * (BB * BX))
    return total


@triton.jit
def group_sum(x, part, sem, rank, exchange, SPLIT: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr,
              BX: tl.constexpr):
    """x (BB, BC) summed over the group's ranks (x itself when SPLIT is 1).

    part: the group's two (SPLIT, BB, BX) slot buffers; exchange: this exchange's running
    number in the launch (its parity picks the buffer).
    """
    if SPLIT == 1:
        return x
    else:
        slot = part + (exchange & 1) * (SPLIT * BB * BX)
        publish(x, slot, rank, 0, BB, BC, BX)
        group_barrier(sem, rank, SPLIT)
        return gather(slot, 0, SPLIT, BB, BC, BX)
