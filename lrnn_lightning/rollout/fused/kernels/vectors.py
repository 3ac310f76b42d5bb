"""One batch row on vectors, every vector in one register layout: the helpers of `resident.resident_row_steps`.

A tile of one row is a (1, N) tensor, and Triton gives every product's output and every
LayerNorm statistic of such tiles its own register layout: the (32, 32, 16, 1) resident step
moved data between layouts 34 times a step, each a shared-memory round trip with a barrier
pair (RESULTS.md). Here the row is a vector and every weight tile is held with d_model along
its columns, so all tiles share one layout:

    columns_product(a, W)    W (N, D) row-major as packed: a along the columns -> (N,) along the rows
                             (the reduction stays within each warp)
    rows_product(v, W_t)     W_t (N, D), a weight stored transposed: v along the rows -> (D,) along the
                             columns (the reduction crosses warps: shared memory, once)

The residual stream and the LayerNorms live along the columns, where every warp holds the
whole vector, so a LayerNorm needs no shared memory. The transposed tiles (the encoder, the
readout C, the MLP down-projection) are read from a transposed copy (`pack.transposed_columns`),
so that every tile loads row-major: a tile read column-major gets a column-major layout, and
vectors would move between the two inside the step loop.

Only weights held in registers for the whole rollout gain from this. A per-step version for
models whose weights are re-read every step was slower than the register kernel's (1, N) tiles
at (32, 128, 64, 4) and (256, 128, 64, 4): 1.7-2.0x, each at its best warp count (RESULTS.md,
sixth session). It was dropped.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.common import row_sum


@triton.jit
def columns_product(x, w):
    """w (N, K) times x (K,), x along the tile's columns -> (N,) along its rows (a reduction within warps)."""
    return row_sum(w * x[None, :], axis=1)


@triton.jit
def rows_product(x, w_t):
    """w_t (K, N), a transposed weight, times x (K,) along its rows -> (N,) along its columns (across warps)."""
    return row_sum(w_t * x[:, None], axis=0)


@triton.jit
def weight_tile(ptr, offsets, mask):
    """The weight tile at ptr + offsets (N, K), zero where masked, in fp32 (bf16 weights are widened)."""
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def normalize_columns(h, g, b, d_ok, D, eps):
    """LayerNorm of h (BD,) with the gain g and bias b (BD,) (zero beyond D)."""
    mean = row_sum(tl.where(d_ok, h, 0.0), axis=0) / D
    centred = tl.where(d_ok, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn(row_sum(centred * centred, axis=0) / D + eps)
    return centred * rstd * g + b


@triton.jit
def mode_vectors(coef_a, coef_b, steps, ps, p_ok, P, EVENT: tl.constexpr):
    """`lti.load_coefficients` as vectors (BP,): coef_a and coef_b as (re, im), and Delta (0 without EVENT)."""
    a_re = tl.load(coef_a + ps, mask=p_ok, other=0.0)
    a_im = tl.load(coef_a + P + ps, mask=p_ok, other=0.0)
    b_re = tl.load(coef_b + ps, mask=p_ok, other=1.0)  # a padded mode's lam is 1: ZOH divides by it
    b_im = tl.load(coef_b + P + ps, mask=p_ok, other=0.0)
    if EVENT:
        step = tl.load(steps + ps, mask=p_ok, other=0.0)
    else:
        step = 0.0 * a_re
    return a_re, a_im, b_re, b_im, step
