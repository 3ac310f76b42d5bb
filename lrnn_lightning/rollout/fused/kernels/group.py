"""Split steps: SPLIT programs share one row tile's step, each streaming 1/SPLIT of the weights.

A one-row program streams every weight of the model from L2 at every step, and one SM
pulls only so many bytes a microsecond: at (32, 128, 64, 4) that, not arithmetic, set the
step time (RESULTS.md). With SPLIT programs per row tile, rank r takes every SPLIT-th block
of modes, Mamba channels and MLP hidden units; what the blocks sum into (the mixer's and
the MLP's output, Mamba's selection) is exchanged through a small memory area, in one of two
protocols (`group_sum` picks by the constexpr TAGGED, `launch.tagged_exchange` by the tile):

tagged (LRU / S5 steps on one-row tiles). Each fp32 value travels in one 64-bit word with the
exchange's tag in its high half (the "low-latency" protocol of NCCL's LL channel), stored and
polled as single strong (relaxed, GPU-scope) accesses; a reader holds a value once its word
shows the tag:

    publish_tagged(partial, slot, rank, col0, tag)   # each rank stores its tagged partial (BB, BC)
    total = gather_tagged(slot, col0, tag)           # every rank waits for the SPLIT partials, adds them

An exchange then costs about one L2 round trip after the last rank stored (0.6-0.8 µs on an
H100 against 1.2-1.3 for the counter, experiments/probe_exchange.py). But a thread waits for
its values one after the other, so where a thread holds several (tiles of several rows) the
round trips add up: at 16 rows x 128 it took 2.9-3.6 µs, the counter 1.5-1.9. Mamba's split
step on 8 warps, its default, ran 2.5x slower tagged (`launch.tagged_exchange` has the figures).

counter (tiles of several rows, Mamba). Plain fp32 stores, then a barrier on a counter per
group, then the loads:

    publish(partial, slot, rank)   # each rank stores its partial sum (BB, BC)
    group_barrier(sem, rank)       # all ranks have stored
    total = gather(slot)           # every rank adds the SPLIT partials, in rank order

The counter's bit 31 flips once all SPLIT ranks arrived (rank 0 adds 2^31 - (SPLIT - 1), the
others 1): it resets itself, so no epoch can overflow, and needs the counter zeroed once.

Both add in rank order, so every rank holds the same bits and computes the same residual
stream (rank 0 alone writes the output). The slots alternate between two buffers, so a slot
is overwritten only two exchanges later, by a rank that has gathered the exchange in
between, which every rank publishes only after it finished reading. For the counter that
is what keeps a reader from missing a value. For tagged words the tags do: the k-th
exchange of a launch is tagged k + 1, and `KernelCall.launch` zeroes the slots first, so a
slot read at exchange k holds zero (only before the launch's first two exchanges), the word
of exchange k - 2 (tag k - 1) or its own (tag k + 1). These never match the wrong one, even
after int32 wrap-around, so a too-early overwrite could only make a reader wait for ever,
never take a stale value. Ranks spin on each other, so all programs must be resident at
once: the launch is cooperative (`launch_cooperative_grid`), which makes a grid that cannot
be an error instead of a hang, and `launch.build_call` keeps the grid within the SM count.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_RANKS = 8  # ranks `gather_tagged` polls at once (config.MAX_SPLIT); with fewer, slots g >= SPLIT re-read g % SPLIT


def _gather_asm(ranks: int) -> str:
    """PTX that loads `ranks` tagged words ($ranks..$2ranks-1), re-reads the stale ones until each tag (high half)
    equals $2ranks, and returns their low halves ($0..$ranks-1). The loads are issued together, so waiting costs
    one round trip, not one a rank. The braces scope the labels and registers to each inlined copy. (A
    nanosleep of 100-400 ns between re-reads, against polling traffic, made the LRU's split step slower.)"""
    lines = ["{", f".reg .pred %lls<{ranks}>;", ".reg .pred %llany;", f".reg .b32 %llhi<{ranks}>;",
             f".reg .b64 %llw<{ranks}>;"]
    lines += [f"ld.relaxed.gpu.global.b64 %llw{g}, [${ranks + g}];" for g in range(ranks)]
    lines.append("LL_CHECK:")
    lines += [f"mov.b64 {{${g}, %llhi{g}}}, %llw{g};" for g in range(ranks)]
    lines += [f"setp.ne.s32 %lls{g}, %llhi{g}, ${2 * ranks};" for g in range(ranks)]
    lines.append("mov.pred %llany, %lls0;")
    lines += [f"or.pred %llany, %llany, %lls{g};" for g in range(1, ranks)]
    lines.append("@!%llany bra LL_DONE;")
    lines += [f"@%lls{g} ld.relaxed.gpu.global.b64 %llw{g}, [${ranks + g}];" for g in range(ranks)]
    lines += ["bra LL_CHECK;", "LL_DONE:", "}"]
    return "\n\t".join(lines)


GATHER_ASM = tl.constexpr(_gather_asm(MAX_RANKS))
GATHER_CONSTRAINTS = tl.constexpr(",".join(["=r"] * MAX_RANKS + ["l"] * MAX_RANKS + ["r"]))
# a strong 64-bit store (a plain st.global is weak: nothing obliges it to become visible to a poll)
PUBLISH_ASM = tl.constexpr("st.relaxed.gpu.global.b64 [$1], $2;\n\tmov.u32 $0, 0;")


@triton.jit
def publish_tagged(x, slot, rank, col0, tag, BB: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    """Store this rank's partial x (BB, BC) fp32, tagged, at columns [col0, col0 + BC) of its (BB, BX) block of
    `slot` (int64 words)."""
    r = tl.arange(0, BB)
    c = tl.arange(0, BC)
    word = x.to(tl.uint32, bitcast=True).to(tl.int64) | (tag.to(tl.int64) << 32)
    cells = slot + rank * (BB * BX) + r[:, None] * BX + col0 + c[None, :]
    tl.inline_asm_elementwise(PUBLISH_ASM, "=r,l,l", [cells, word], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def gather_tagged(slot, col0, tag, SPLIT: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    """The sum over ranks 0, 1, .. SPLIT - 1 (in that order) of their (BB, BC) partials published with `tag`,
    waiting for each (SPLIT <= MAX_RANKS); returns once every thread of the program has read its values."""
    tl.static_assert(SPLIT <= 8, "gather_tagged polls at most MAX_RANKS (8) ranks")
    r = tl.arange(0, BB)
    c = tl.arange(0, BC)
    cells = slot + r[:, None] * BX + col0 + c[None, :]
    block = BB * BX
    v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
        GATHER_ASM, GATHER_CONSTRAINTS,
        [cells, cells + (1 % SPLIT) * block, cells + (2 % SPLIT) * block, cells + (3 % SPLIT) * block,
         cells + (4 % SPLIT) * block, cells + (5 % SPLIT) * block, cells + (6 % SPLIT) * block,
         cells + (7 % SPLIT) * block, tag],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=False, pack=1)
    total = v0.to(tl.float32, bitcast=True)
    if SPLIT > 1:
        total += v1.to(tl.float32, bitcast=True)
    if SPLIT > 2:
        total += v2.to(tl.float32, bitcast=True)
    if SPLIT > 3:
        total += v3.to(tl.float32, bitcast=True)
    if SPLIT > 4:
        total += v4.to(tl.float32, bitcast=True)
    if SPLIT > 5:
        total += v5.to(tl.float32, bitcast=True)
    if SPLIT > 6:
        total += v6.to(tl.float32, bitcast=True)
    if SPLIT > 7:
        total += v7.to(tl.float32, bitcast=True)
    # the next exchange's stores (which may overwrite this one's buffer two exchanges on, see the module doc)
    # follow every thread's reads of this one: each poll loop exits only once its loads have returned
    tl.debug_barrier()
    return total


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
    """Store this rank's partial x (BB, BC) at columns [col0, col0 + BC) of its (BB, BX) block in `slot` (fp32)."""
    r = tl.arange(0, BB)
    c = tl.arange(0, BC)
    tl.store(slot + rank * (BB * BX) + r[:, None] * BX + col0 + c[None, :], x)


@triton.jit
def gather(slot, col0, SPLIT: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    """The sum over ranks 0, 1, .. SPLIT - 1 (in that order) of their published (BB, BC) fp32 partials."""
    r = tl.arange(0, BB)
    c = tl.arange(0, BC)
    cells = slot + r[:, None] * BX + col0 + c[None, :]
    total = tl.load(cells)
    for g in tl.static_range(1, SPLIT):
        total += tl.load(cells + g * (BB * BX))
    return total


@triton.jit
def exchange_slot(part, exchange, SPLIT: tl.constexpr, TAGGED: tl.constexpr, BB: tl.constexpr, BX: tl.constexpr):
    """The (SPLIT, BB, BX) slot of the group's two buffers `part` (int64) that exchange number `exchange` uses:
    int64 words for the tagged protocol, fp32 values (in the first half) for the counter."""
    if TAGGED:
        return part + (exchange & 1) * (SPLIT * BB * BX)
    else:
        return part.to(tl.pointer_type(tl.float32)) + (exchange & 1) * (SPLIT * BB * BX)


@triton.jit
def group_sum(x, part, sem, rank, exchange, SPLIT: tl.constexpr, TAGGED: tl.constexpr, BB: tl.constexpr,
              BC: tl.constexpr, BX: tl.constexpr):
    """x (BB, BC) summed over the group's ranks (x itself when SPLIT is 1).

    part: the group's two (SPLIT, BB, BX) int64 slot buffers and sem its int32 counter, zeroed before the
    launch; exchange: this exchange's running number in the launch, from 0 (its parity picks the buffer,
    exchange + 1 is its tag); TAGGED: the protocol (module doc).
    """
    if SPLIT == 1:
        return x
    else:
        slot = exchange_slot(part, exchange, SPLIT, TAGGED, BB, BX)
        if TAGGED:
            publish_tagged(x, slot, rank, 0, exchange + 1, BB, BC, BX)
            total = gather_tagged(slot, 0, exchange + 1, SPLIT, BB, BC, BX)
        else:
            publish(x, slot, rank, 0, BB, BC, BX)
            group_barrier(sem, rank, SPLIT)
            total = gather(slot, 0, SPLIT, BB, BC, BX)
        return total
