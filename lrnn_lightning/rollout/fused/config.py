"""Launch shape of the fused kernel: `KernelConfig`, and `default_config`, the rule that picks one.

    config = default_config(batch=32, n_sms=132)     # KernelConfig(block_b=1, ..., num_warps=8): 32 programs

Why the rule looks as it does. One program owns `block_b` batch rows for the whole rollout
and streams every weight of the model (from L1/L2) at every step. What an H100 measured
(experiments/RESULTS.md, 2026-11-27, LRU, µs per step of the kernel) decided the rule:

- one row a program, 8 warps, while there is at most one row per SM: the one-row product
  runs in the weight tile's own register layout (kernels/common.py), so a program spends
  its time streaming weights, and more programs stream in parallel: (32, 128, 64, 4) took
  47 µs with 32 one-row programs against 67-78 µs for two 16-row tl.dot programs (bf16,
  tensor cores) and 464 µs for two exact-fp32 ones; 8 warps beat 4 (7.0 vs 10.5 µs at
  (32, 32, 16, 1), 55 vs 75 at (32, 128, 64, 4)); bf16 weights the same (7.0 vs 7.9 µs);
- exact fp32 ("ieee") keeps one-row programs up to MAX_ONE_ROW_PROGRAMS_PER_SM per SM,
  then with 4 warps: B=256 (two per SM) took 84 µs against 231 for 128 programs of two rows
  and 233 for tl.dot tiles; beyond, 16-row tl.dot tiles (B=1024: 14.5 ms; the 2-8 row
  tiles, a broadcast product through shared memory, were slower everywhere; multiplied row by
  row since the eleventh session, 2-row tiles equal one-row programs at B=256, 73-79 against
  75 µs, and lose at B=128, 73-78 against 46, and 4-row tiles took 146-210 µs at B=256);
- tensor-core precisions (tf32x3, tf32, bf16 weights) past one row per SM: tl.dot tiles of
  16 rows (B=256 bf16: 73 µs vs 88 for one-row programs), 32 with 8 warps beyond 16 rows
  per SM, and 8 warps from d_model WIDE_D_MODEL on (74 vs 110 µs at d_model 128).

Split steps (`KernelConfig.split`, kernels/group.py). Where row tiles leave SMs idle, the
register kernel splits each tile's step over several programs, each streaming 1/split of the
weights and exchanging partial sums (2 a layer, Mamba 3). On the H100 at B=32
(32 one-row tiles, 4 programs each): (32, 128, 64, 4) LRU 54 -> 35 µs, Mamba 176 -> 69 µs
per step; but (32, 32, 16, 1) Mamba 7.5 -> 12 µs, where the barriers cost more than the
streaming they share; at (32, 64, 32, 2) the LRU (0.27 MB of weights) got slower split
(13 -> 15-20 µs) and the Mamba (0.52 MB) faster (29 -> 26). So steps that exchange through
the counter split only where they stream at least SPLIT_MIN_WEIGHT_BYTES (384 KB), as far as
all programs stay resident: at B=1 and 8 the 4-layer models then run split 8 (LRU 55 -> 34 µs,
Mamba 168 -> 54). LRU / S5 one-row steps exchange tagged words, about half as dear
(kernels/group.py), and from a padded d_model of SPLIT_LAYER_RULE_MIN_D_MODEL on split from
SPLIT_MIN_LAYER_BYTES (64 KB) of weights a layer (the model's bytes over its layers), with
NARROW_SPLIT_WARPS warps up to d_model NARROW_SPLIT_D_MODEL; a model that keeps its weights in
registers (kernels/resident.py) never splits. Measured on fp32 weights, 1-4 layers (bf16 weights
count their own, halved, bytes: not measured) (tenth session, B=32, LRU / S5, µs
per step, before -> after): (32, 48, 24, 4) 16.3 -> 13.6-14.0 and 15.4 -> 13.8-14.0, (32, 64, 32, 2)
8.7-8.8 -> 7.1-7.5, (32, 64, 32, 3) 11.5 (split, 8 warps) -> 10.3-10.5 and 13.1 -> 10.5-10.6; at B=16,
(64, 32, 2) 8.8 -> 6.4-6.8. At d_model 32 (about 34 KB a layer) a split was slower (LRU (32, 32,
16, 4): 7.7-8.1 unsplit, 10.1-12.3 split), and at d_model 128 8 warps stay faster (23.4 vs 24.2).

What `launch.default_launch` adds, knowing the model (H100, 2026-11-27, µs per step of the kernel):
- tensor-core tl.dot tiles of an LRU at d_model 128, 4 layers, split as `default_split` says where at
  least MIN_DOT_SPLIT programs fit each tile, with 4 warps: B=256 bf16 71 -> 53 (split 8), tf32x3 229 ->
  161; B=512 bf16 67 -> 54 (split 4), tf32x3 232 -> 198; at B=1024 (split 2 at most) no gain (bf16 74 vs
  88 split with 4 warps) and tf32x3 split 2 with 8 warps ran 9x slower, hence the minimum of 4;
- Mamba's 16-row state tiles do not fit the register kernel, so its tensor-core tiles ran the scratch
  kernel: B=256 bf16 1146 µs, twice the graph's 576; up to MAX_ONE_ROW_PROGRAMS_PER_SM rows per SM it
  takes one-row programs (4 warps) instead, as exact fp32 does;
- one-layer LRU / S5 models whose weights and state stay in registers (kernels/resident.py) run
  fastest with RESIDENT_WARPS: (32, 32, 16, 1), one row a program on vectors (resident_row_steps), LRU
  1.89 µs with 4 warps, 2.25 with 8; S5 1.84 and 2.23 (the (1, N) tile path: LRU 2.20 / 2.23);
- one-row LRU / S5 steps that split take NARROW_SPLIT_WARPS up to d_model NARROW_SPLIT_D_MODEL (the
  split paragraph above).

Chunked weight tiles (REDUCTION_CHUNK, kernels/common.py `chunked_product`): a one-row program with bf16
weights (not a resident one) loads its LRU / S5 mode tiles and MLP tiles as (K / 16, N, 16), so that each
thread sums more of a row itself and fewer shuffles remain. H100, eleventh session, µs per step, flat ->
chunked: bf16 (32, 128, 64, 4) LRU 21.7 -> 19.0, S5 21.6 -> 17.9, Mamba (its MLP only) 63.2 -> 60.6, LRU
(32, 64, 32, 2) 6.4 -> 5.9, (32, 48, 24, 4) 15.8 -> 12.9, (1, 128, 64, 4) 15.6 -> 14.7. On fp32 weights
the split steps stayed within +-2% or lost up to 13%, and unsplit one-row programs lost 15-27% (B=128:
44 -> 51; B=256: 73 -> 91), so fp32 tiles stay flat.

Phased steps (kernels/phased.py, `phased_config`). Past MAX_ONE_ROW_PROGRAMS_PER_SM rows per SM, an LRU / S5
model from a padded d_model of PHASED_MIN_D_MODEL on runs each step as phases of tiles shared by the whole
GPU, each tile waiting only for the previous phase's tiles on its rows, instead of row tiles that each stream the
whole model. H100,
twelfth session, (1024, 512, 128, 8), µs per step of the kernel alone: bf16 4137 (16-row tiles) -> 302-324
(the fp32 graph's 1384: 0.33x -> 4.3-4.4x; whole calls 4.0-4.3x), tf32x3 6193 -> 1450, exact fp32
14600 -> 3640 (both still slower than the fp32 graph). Thirteenth session, bf16: the products after a
LayerNorm multiply a centred bf16 copy of h by weights with the norm's gain folded in (fold.py) and the
modes, decoding and down-projection take their own tiles (`phased_launch.phased_blocks`): 320 -> 251-255
(the kernel alone 5.2-5.4x faster than the fp32 graph; whole calls 4.9-5.1x). At d_model 128 the
register kernel's tiles were as fast or faster (bf16, B=1024: 62.9 against 61.5-92.3 µs; B=512: 47.9
against 60.6-90.1), so narrower models kept them. Fifteenth session: with the
grid-wide barriers between phases replaced by counters per row block (kernels/phased.py), bf16 kernel 249-257 ->
235-246 (whole calls 5.2-5.4x the fp32 graph), tf32x3 1448-1466 -> 1415-1443; the phase tiles were timed again
under the counters and kept. At (256, 128, 64, 4) (bf16, LRU) phased steps still lose to the split register
steps: 52.5 µs (16-row tiles) against 42.0. At d_model 256 beyond two rows per SM the register kernel's tiles
were far slower than phased steps (H200, kernel alone, µs a step; LRU / S5): (512, 256, 64, 6) bf16 1499 / 1429
against 95.7 / 93.1 on 32-row phased tiles (111 / 109 on 64-row ones; graph 401 / 335), fp32 2234 / 2084 against
780 / 739; (1024, 256, 128, 8) bf16 626 / 528 against 134 / 131 (graph 685 / 639), fp32 3642 / 3239 against
1270 / 1013. So phased steps start at a padded d_model of 256, on 32-row tiles below PHASED_WIDE_D_MODEL (at
(1024, 384, 128, 8), padded 512, 64-row tiles: 208 / 190 against 260 / 250). At d_model 128 (B=1024) 32-row
phased tiles were 5-15% faster than the register kernel's in bf16 (53.0 / 52.3 against 62.4 / 55.2) and 33%
in fp32 (304 / 280 against 455 / 401; graph 235 / 196). Sixteenth session (H100, kernel alone, LRU / S5, 32-row
phased tiles against the default): fp32 B=512 303 / 283 against 452 / 399 (graph 196 / 176), B=2048 336 / 283
against 450 / 394; bf16 B=384 and 512 51.8 / 50.6 and 53.5 / 52.5 against 47.5 / 44.2 and 47.9 / 45.3 (16-row
register tiles split 4 ways), B=640 53.5 / 52.7 against 63.0 / 55.3, B=2048 52.1 / 51.4 against 62.4 / 54.6 (tiles
too many to split MIN_DOT_SPLIT ways). So at a padded d_model of PHASED_NARROW_D_MODEL (measured at 128) exact fp32
("ieee") weights take 32-row phased steps past MAX_ONE_ROW_PROGRAMS_PER_SM rows per SM, and bf16 ones where the
register kernel's 16-row tiles are too many to split MIN_DOT_SPLIT ways (B > 528 on an H100;
`phased_launch.phased_pays`); tf32 and tf32x3 dots, not measured there, keep the register kernel.

`experiments/benchmark_fused.py --block-bs ... --warps ... --splits ...` times other shapes
against this choice on a GPU. The 2, 4 and 8-row small tiles stay available for explicit configs: their
(rows, block_n, block_k) product is sized to SMALL_TILE elements.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

SMALL_BLOCK_BS = (1, 2, 4, 8)  # rows per program multiplied without tl.dot
DOT_BLOCK_BS = (16, 32, 64)  # rows per program multiplied with tl.dot
BLOCK_BS = SMALL_BLOCK_BS + DOT_BLOCK_BS
SMALL_TILE = 4096  # elements of a small tile's (rows, block_n, block_k) product
CPU_PROCESSORS = 1  # the Triton interpreter runs one program at a time
MAX_ONE_ROW_PROGRAMS_PER_SM = 2  # exact fp32: one-row programs up to this many per SM (module doc)
ONE_ROW_WARPS = 8  # warps of a one-row program when it has its SM to itself (module doc)
WIDE_D_MODEL = 128  # from this width on, tensor-core tl.dot tiles run with 8 warps (module doc)
ACTIVATIONS = ("auto", "registers", "scratch", "phased")
MAX_SPLIT = 8  # programs a row tile's step may be split over (kernels/group.py)
SPLIT_MIN_WEIGHT_BYTES = 384 << 10  # split only steps that stream at least this many weight bytes (module doc)
SPLIT_MIN_LAYER_BYTES = 64 << 10  # ... or this many a layer: one-row LRU / S5 steps with tagged exchanges,
SPLIT_LAYER_RULE_MIN_D_MODEL = 64  # from this padded d_model on (at 32, splits were slower; module doc)
NARROW_SPLIT_D_MODEL = 64  # split one-row LRU / S5 steps up to this (padded) d_model run NARROW_SPLIT_WARPS
NARROW_SPLIT_WARPS = 4
MIN_DOT_SPLIT = 4  # tl.dot tiles split by default only this many ways or more (module doc)
DOT_SPLIT_WARPS = 4  # warps of a split tl.dot tile (module doc)
RESIDENT_WARPS = 4  # warps of a whole-model-resident one-row program (module doc)
REDUCTION_CHUNK = 16  # one-row programs with bf16 weights sum their tiles in chunks this wide (module doc)
PHASED_MIN_D_MODEL = 256  # LRU / S5 models from this padded d_model on take phased steps at large batch (module doc)
PHASED_NARROW_D_MODEL = 128  # ... and of this one: exact fp32 past two rows per SM, bf16 where tiles stop splitting
PHASED_WIDE_D_MODEL = 512  # phased steps on 64-row tiles from this padded d_model on, 32-row tiles below (module doc)


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of the fused kernel.

    Attributes:
        block_b: batch rows per program: 1, 2, 4 or 8 (matmuls as broadcast products on the
            FMA units) or 16, 32, 64 (tl.dot).
        block_n: largest output-feature block of a tiled matmul (a power of two >= 16); in the
            register kernel, the largest block of modes, MLP hidden units and Mamba channels.
        block_k: reduction block of every tiled matmul of the scratch kernel (a power of two >=
            16); Triton's fp32 FMA dot keeps whole K-slices in registers, so small is better
            there. The register kernel reduces over whole rows and ignores it.
        num_warps: warps per program (a power of two, 1-32).
        activations: where a step's activations live: "registers" (the register-resident
            kernel, kernels/registers.py: LRU, S5 and Mamba models narrow enough for its tiles),
            "scratch" (per-program scratch memory, kernels/rollout.py: every covered mixer and
            width), "phased" (kernels/phased.py: LRU and S5 at large batch, every step's matmuls
            cut into tiles shared by the whole GPU; `phased_launch.py` says what the other fields
            mean there), or "auto" (registers where they fit, see `launch.registers_fit`).
        split: programs that share one row tile's step in the register kernel, each streaming
            1/split of the weights (kernels/group.py): 1 to MAX_SPLIT, with every program of
            the grid resident at once (grid <= SMs). None lets `default_split` choose for
            small tiles (block_b < 16) whose step is worth splitting (`launch.split_pays`) and
            runs tl.dot tiles unsplit; the scratch kernel runs unsplit.
    """

    block_b: int = 16
    block_n: int = 64
    block_k: int = 16
    num_warps: int = 4
    activations: str = "auto"
    split: int | None = None


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): the padded size of a kernel block."""
    return 1 << max(0, int(n) - 1).bit_length()


def small_tile_config(block_b: int) -> KernelConfig:
    """The launch shape of a small tile of `block_b` (1, 2, 4 or 8) rows: a (block_b, n, k) product of SMALL_TILE."""
    if block_b not in SMALL_BLOCK_BS:
        raise ValueError(f"small_tile_config: block_b must be one of {SMALL_BLOCK_BS}, got {block_b!r}.")
    block_k = max(16, min(64, SMALL_TILE // (64 * block_b)))
    return KernelConfig(block_b=block_b, block_n=max(16, min(64, SMALL_TILE // (block_b * block_k))),
                        block_k=block_k, num_warps=4)


def dot_tile_config(block_b: int, tensor_cores: bool) -> KernelConfig:
    """The launch shape of a tl.dot tile of `block_b` (16, 32 or 64) rows."""
    if block_b not in DOT_BLOCK_BS:
        raise ValueError(f"dot_tile_config: block_b must be one of {DOT_BLOCK_BS}, got {block_b!r}.")
    if not tensor_cores:
        return KernelConfig(block_b=block_b, block_n=64, block_k=16, num_warps=4 if block_b == 16 else 8)
    return KernelConfig(block_b=block_b, block_n=64, block_k=32, num_warps=4 if block_b == 16 else 8)


def default_config(batch: int, weight_dtype: torch.dtype = torch.float32, precision: str = "ieee", *,
                   n_sms: int | None = None, d_model: int | None = None) -> KernelConfig:
    """The launch shape for `batch` rows on a GPU of `n_sms` SMs (see the module doc for the rule).

    Args:
        batch: rows of the rollout.
        weight_dtype: the kernel's matmul weight dtype (float32 or bfloat16).
        precision: tl.dot input precision for float32 weights ("ieee", "tf32x3", "tf32").
        n_sms: streaming multiprocessors (132 on an H100 SXM); None asks the current CUDA
            device, or takes 1 without one (the interpreter runs one program at a time).
        d_model: the model's width, if known: tensor-core tl.dot tiles take 8 warps from
            WIDE_D_MODEL on.

    Example:
        >>> [default_config(b, n_sms=132).block_b for b in (32, 256, 1024, 4096)]
        [1, 1, 16, 16]
    """
    if n_sms is None:
        n_sms = processor_count(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if n_sms < 1 or batch < 1:
        raise ValueError(f"default_config: batch and n_sms must be >= 1, got batch={batch}, n_sms={n_sms}.")
    rows_per_sm = -(-batch // n_sms)
    tensor_cores = weight_dtype == torch.bfloat16 or precision != "ieee"
    if rows_per_sm <= (1 if tensor_cores else MAX_ONE_ROW_PROGRAMS_PER_SM):
        return replace(small_tile_config(1), num_warps=ONE_ROW_WARPS if rows_per_sm == 1 else 4)
    config = dot_tile_config(32 if tensor_cores and rows_per_sm > 16 else 16, tensor_cores)
    if tensor_cores and d_model is not None and d_model >= WIDE_D_MODEL:
        return replace(config, num_warps=8)
    return config


def phased_config(weight_dtype: torch.dtype = torch.float32, d_model: int = PHASED_WIDE_D_MODEL) -> KernelConfig:
    """The launch shape of phased steps (kernels/phased.py) for a model of `d_model`: 64-row tiles from a padded
    d_model of PHASED_WIDE_D_MODEL on, 32-row tiles below; bf16 weights stream 64-wide chunks on 8 warps (H100,
    twelfth session: 317-324 µs a step at (1024, 512, 128, 8), against 340-400 for 32-row tiles, 4 warps or
    32-wide chunks; 251-258 since the thirteenth's folded products, where 32-wide chunks took 289), fp32 ones
    32-wide chunks on 4 warps (64-wide tf32x3 chunks on 8 warps exceed the shared memory)."""
    rows = 64 if next_pow2(d_model) >= PHASED_WIDE_D_MODEL else 32
    if weight_dtype == torch.bfloat16:
        return KernelConfig(block_b=rows, block_n=64, block_k=64, num_warps=8, activations="phased")
    return KernelConfig(block_b=rows, block_n=64, block_k=32, num_warps=4, activations="phased")


def default_split(tiles: int, n_sms: int, blocks: int) -> int:
    """Programs per row tile for the register kernel (kernels/group.py), for a step worth splitting
    (`launch.split_pays`): the largest power of two up to MAX_SPLIT that keeps all `tiles * split` programs
    on the `n_sms` SMs at once and gives every program one of the step's `blocks` (blocks of its widest
    blocked loop)."""
    split = 1
    while 2 * split <= MAX_SPLIT and tiles * 2 * split <= n_sms and 2 * split <= blocks:
        split *= 2
    return split


def processor_count(device: torch.device) -> int:
    """SMs of a CUDA device (what `default_config` spreads the batch over); CPU_PROCESSORS elsewhere."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return CPU_PROCESSORS


@functools.cache
def _sm_count(index: int) -> int:  # asked at every fused call: a device's count never changes
    return int(torch.cuda.get_device_properties(index).multi_processor_count)
