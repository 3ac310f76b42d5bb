"""Launch shape of the fused kernel: `KernelConfig`, and `default_config`, the rule that picks one.

    config = default_config(batch=256, n_sms=132)     # KernelConfig(block_b=2, ...): 128 programs, one per SM

Why the rule looks as it does. One program owns `block_b` batch rows for the whole rollout
and streams every weight of the model (from L2) at every step, so a step costs each SM
about (programs on it) x (weight bytes) / (its L2 bandwidth), and the whole GPU about
programs x weight bytes / (L2 bandwidth). Hence:

- one wave: the smallest block_b (a power of two) with at most one program per SM, i.e.
  block_b >= batch / n_sms. Fewer rows per program would put two programs (two weight
  streams) on an SM for no gain: a probe with one row a program took 30 µs/step for LRU
  (32, 128, 64, 4) on an H100 and 61 µs for B=256, twice the streams in twice the time.
  More rows would leave SMs idle. At small batch this means 1 or 2 rows a program (see the
  measurements below for why not 4 or 8);
- tiles of fewer than 16 rows multiply without tl.dot (broadcast product summed over K on
  the FMA units; tl.dot needs 16 rows): at B=32 on a 132-SM H100 that is 32 programs of one
  row instead of 2 programs of 16;
- beyond MAX_SMALL_ROWS_PER_SM rows per SM in exact fp32, tl.dot tiles of 16 rows ("ieee"
  runs on the FMA units, which want short tiles; several waves then); for the tensor-core
  precisions (tf32x3, tf32, bf16 weights) tl.dot tiles at every batch, 16 rows, or 32 with
  8 warps beyond 16 rows per SM.

The small tiles are sized so the (rows, block_n, block_k) product stays at 4096 elements,
32 fp32 registers a thread with 4 warps. `experiments/benchmark_fused.py --block-bs` times
other block_b values against this choice on a GPU.

What the H100 measured (experiments/RESULTS.md, 2026-11-27) narrowed the rule: small tiles
won only in exact fp32 ("ieee") and only at one or two rows per SM (LRU (32, 128, 64, 4):
1 row 183 µs/step vs 16 rows 479; B=256: 2 rows 256 vs 480), while at 8 rows per SM (B=1024)
they lost to 16-row tl.dot tiles (25287 vs 14640), and with tensor cores (tf32x3, bf16) the
16-row tl.dot tile won at every batch (B=32: 206 / 153 µs vs 192 / 174 for one row). So small
tiles are used for "ieee" up to MAX_SMALL_ROWS_PER_SM rows per SM, tl.dot tiles otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

SMALL_BLOCK_BS = (1, 2, 4, 8)  # rows per program multiplied without tl.dot
DOT_BLOCK_BS = (16, 32, 64)  # rows per program multiplied with tl.dot
BLOCK_BS = SMALL_BLOCK_BS + DOT_BLOCK_BS
SMALL_TILE = 4096  # elements of a small tile's (rows, block_n, block_k) product
CPU_PROCESSORS = 1  # the Triton interpreter runs one program at a time
MAX_SMALL_ROWS_PER_SM = 2  # beyond this, 16-row tl.dot tiles were faster on an H100 (module doc)
WIDE_D_MODEL = 128  # from this width on, 8 warps beat 4 in the register kernel (H100: 136 vs 167 µs/step fp32,
# 74 vs 110 bf16, LRU (32, 128, 64, 4)); at d_model 32 4 warps were best (RESULTS.md, 2026-11-27)
ACTIVATIONS = ("auto", "registers", "scratch")


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of the fused kernel.

    Attributes:
        block_b: batch rows per program: 1, 2, 4 or 8 (matmuls as broadcast products on the
            FMA units) or 16, 32, 64 (tl.dot).
        block_n: largest output-feature block of a tiled matmul (a power of two >= 16).
        block_k: reduction block of every tiled matmul (a power of two >= 16); Triton's fp32
            FMA dot keeps whole K-slices in registers, so small is better there.
        num_warps: warps per program.
        activations: where a step's activations live: "registers" (the register-resident
            kernel, kernels/registers.py: LRU and S5 models narrow enough for a register tile),
            "scratch" (per-program scratch memory, kernels/rollout.py: every covered mixer and
            width), or "auto" (registers where they fit, see `launch.registers_fit`).
    """

    block_b: int = 16
    block_n: int = 64
    block_k: int = 16
    num_warps: int = 4
    activations: str = "auto"


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
        d_model: the model's width, if known: from WIDE_D_MODEL on, 8 warps a program (each
            program then streams more weight bytes per step, and more warps keep more in flight).

    Example:
        >>> [default_config(b, n_sms=132).block_b for b in (32, 256, 1024, 4096)]
        [1, 2, 16, 16]
    """
    if n_sms is None:
        n_sms = processor_count(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if n_sms < 1 or batch < 1:
        raise ValueError(f"default_config: batch and n_sms must be >= 1, got batch={batch}, n_sms={n_sms}.")
    rows_per_sm = -(-batch // n_sms)
    block_b = 1 << (rows_per_sm - 1).bit_length()  # the smallest power of two >= batch / n_sms: one wave
    tensor_cores = weight_dtype == torch.bfloat16 or precision != "ieee"
    if not tensor_cores and block_b <= MAX_SMALL_ROWS_PER_SM:
        config = small_tile_config(block_b)
    else:
        config = dot_tile_config(32 if tensor_cores and block_b >= 32 else 16, tensor_cores)
    if d_model is not None and d_model >= WIDE_D_MODEL and (tensor_cores or config.block_b < 16):
        return replace(config, num_warps=8)
    return config


def processor_count(device: torch.device) -> int:
    """SMs of a CUDA device (what `default_config` spreads the batch over); CPU_PROCESSORS elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return CPU_PROCESSORS
