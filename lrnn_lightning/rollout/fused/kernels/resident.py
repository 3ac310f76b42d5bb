"""The whole-model-resident rollout of a one-layer LRU / S5 model: weights and state stay in registers.

The register kernel (registers.py) loads each weight tile and the recurrent state from
L1/L2 at every step, and each load is one more latency on the step's critical path. When
the model has one layer whose modes and MLP hidden units each fit one block (BP >= P,
BF >= F; `launch.resident_fits`), everything a step reads fits the registers of one
program: here all of it is loaded once, before the first step, the state is carried from
step to step in registers and written back after the last, and a step reads nothing from
memory but its event dt. Two versions: `resident_modal_steps` for tiles of rows, with the
register kernel's own arithmetic (blocks.py), and `resident_row_steps` for one row a
program, on vectors in one register layout (vectors.py), about 15% faster at (32, 32, 16, 1).
Both compute the same numbers to fp32 rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.blocks import mlp_block, mlp_tiles, modal_block, mode_tiles, normalize_with
from lrnn_lightning.rollout.fused.kernels.common import gelu, product, row_sum
from lrnn_lightning.rollout.fused.kernels.lti import advance_modes, discretize, load_coefficients
from lrnn_lightning.rollout.fused.kernels.vectors import (
    columns_product,
    mode_vectors,
    normalize_columns,
    rows_product,
    weight_tile,
)


@triton.jit
def norm_parameters(norm1_g, norm1_b, norm2_g, norm2_b, final_g, final_b, ds, d_ok):
    """The gains and biases (BD,) of a one-layer model's three LayerNorms at the columns ds, zero beyond D."""
    return (tl.load(norm1_g + ds, mask=d_ok, other=0.0), tl.load(norm1_b + ds, mask=d_ok, other=0.0),
            tl.load(norm2_g + ds, mask=d_ok, other=0.0), tl.load(norm2_b + ds, mask=d_ok, other=0.0),
            tl.load(final_g + ds, mask=d_ok, other=0.0), tl.load(final_b + ds, mask=d_ok, other=0.0))


@triton.jit
def resident_modal_steps(x, out_rows, out_stride_t, io_mask, dt_ptr, dt_stride_b, rows, row_ok, state, s_stride,
                         enc, enc_bias, dec, dec_bias, final_g, final_b, norm1_g, norm1_b, norm2_g, norm2_b,
                         up_w, up_b, down_w, down_b, win, readout, skip, coef_a, coef_b, steps,
                         n_steps, D, F, P, eps, RULE: tl.constexpr, EVENT: tl.constexpr, HAS_SCALE: tl.constexpr,
                         BB: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr, BF: tl.constexpr,
                         PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """n_steps steps of a one-layer modal model from x (BB, BW), writing step t's output at out_rows + (t+1) stride.

    Arguments as in `register_rollout_kernel` (layer 0's slices): enc, enc_bias, dec and
    dec_bias already loaded; win (2P, D), readout (D, 2P), skip (D,), coef_a, coef_b (2, P) and
    steps (P,) as in `registers.modal_mixer`; the state (BB rows of stride s_stride) holds
    [s_re, s_im] per row and is written back after the last step.
    """
    ds = tl.arange(0, BD)
    d_ok = ds < D
    ps = tl.arange(0, BP)
    p_ok = ps < P
    b_re, b_im, c_re, c_im = mode_tiles(win, readout, D, P, 0, BD, BP, 0)
    a_re, a_im, k_re, k_im, delta = load_coefficients(coef_a, coef_b, steps, ps, p_ok, P, EVENT)
    skip_d = tl.load(skip + ds, mask=d_ok, other=0.0)[None, :]
    g1, b1, g2, b2, gf, bf = norm_parameters(norm1_g, norm1_b, norm2_g, norm2_b, final_g, final_b, ds, d_ok)
    w_value, w_gate, w_down, b_value, b_gate = mlp_tiles(up_w, up_b, down_w, D, F, 0, BD, BF, 0)
    mlp_bias = tl.load(down_b + ds, mask=d_ok, other=0.0)[None, :]
    s_mask = row_ok[:, None] & p_ok[None, :]
    s_re_ptr = state + rows[:, None] * s_stride + ps[None, :]
    s_re = tl.load(s_re_ptr, mask=s_mask, other=0.0)
    s_im = tl.load(s_re_ptr + P, mask=s_mask, other=0.0)
    for t in range(n_steps):
        if EVENT:
            dt = tl.load(dt_ptr + rows * dt_stride_b + t, mask=row_ok, other=1.0)
            decay_re, decay_im, scale_re, scale_im = discretize(dt[:, None], a_re, a_im, k_re, k_im, delta, RULE)
        else:
            decay_re, decay_im, scale_re, scale_im = a_re, a_im, k_re, k_im
        h = product(x, enc, BB, PREC, W_BF16, EMULATE_BF16) + enc_bias
        a = normalize_with(h, g1, b1, D, eps, BD)
        y, s_re, s_im = modal_block(a, b_re, b_im, c_re, c_im, s_re, s_im, decay_re, decay_im, scale_re, scale_im,
                                    HAS_SCALE, BB, 0, PREC, W_BF16, EMULATE_BF16)
        h = h + y + skip_d * a
        a = normalize_with(h, g2, b2, D, eps, BD)
        h = h + (mlp_block(a, w_value, w_gate, w_down, b_value, b_gate, BB, 0, PREC, W_BF16, EMULATE_BF16) + mlp_bias)
        a = normalize_with(h, gf, bf, D, eps, BD)
        x = product(a, dec, BB, PREC, W_BF16, EMULATE_BF16) + dec_bias
        tl.store(out_rows + (t + 1) * out_stride_t, x, mask=io_mask)
    tl.debug_barrier()  # every thread read its copy of the state (before the first step) before any writes
    tl.store(s_re_ptr, s_re, mask=s_mask)
    tl.store(s_re_ptr + P, s_im, mask=s_mask)


@triton.jit
def resident_row_steps(out_row, out_stride_t, dt_row, row_ok, state_row, columns, enc_b, dec_w, dec_b,
                       final_g, final_b, norm1_g, norm1_b, norm2_g, norm2_b, up_w, up_b, down_b,
                       win, skip, coef_a, coef_b, steps, n_steps, W, D, F, P, eps,
                       RULE: tl.constexpr, EVENT: tl.constexpr, HAS_SCALE: tl.constexpr, BW: tl.constexpr,
                       BD: tl.constexpr, BP: tl.constexpr, BF: tl.constexpr):
    """`resident_modal_steps` for one row a program, on vectors, from pointers to that row.

    out_row points at the row's x0 (W,) (step t's output goes t + 1 strides on), dt_row at its
    dt (n_steps,) with EVENT, state_row at its [s_re, s_im]; row_ok says the row exists.
    columns (W + 2P + F, D) holds the encoder, the readout C and the MLP's down-projection
    transposed (`pack.transposed_columns`); the other weights are as packed (layer 0), in fp32
    or bf16 (widened to fp32, as in `common.small_product`: exact fp32 arithmetic).

    With every tile held row-major, d_model along its columns, Triton gives them all one
    register layout (a tile read column-major gets another, and vectors would move between
    the two inside the step loop). The residual stream and the LayerNorms live along the
    columns, where every warp holds the whole vector, so a LayerNorm needs no shared memory; a
    step moves data between warps in its three products with transposed tiles, in the output
    store and, with event dt under ZOH, in its complex division (two layout conversions):
    the (1, N) tiles of `resident_modal_steps` made 34 conversions a step (RESULTS.md).
    """
    ws = tl.arange(0, BW)
    w_ok = ws < W
    x_ok = ws < tl.where(row_ok, W, 0)
    ds = tl.arange(0, BD)
    d_ok = ds < D
    ps = tl.arange(0, BP)
    p_ok = ps < P
    fs = tl.arange(0, BF)
    f_ok = fs < F
    wd_mask = w_ok[:, None] & d_ok[None, :]
    pd_mask = p_ok[:, None] & d_ok[None, :]
    enc_t = weight_tile(columns, ws[:, None] * D + ds[None, :], wd_mask)
    enc_bias = tl.load(enc_b + ds, mask=d_ok, other=0.0)
    dec = weight_tile(dec_w, ws[:, None] * D + ds[None, :], wd_mask)
    dec_bias = tl.load(dec_b + ws, mask=w_ok, other=0.0)
    b_re = weight_tile(win, ps[:, None] * D + ds[None, :], pd_mask)
    b_im = weight_tile(win, (P + ps)[:, None] * D + ds[None, :], pd_mask)
    c_re_t = weight_tile(columns, (W + ps)[:, None] * D + ds[None, :], pd_mask)
    c_im_t = weight_tile(columns, (W + P + ps)[:, None] * D + ds[None, :], pd_mask)
    a_re, a_im, k_re, k_im, delta = mode_vectors(coef_a, coef_b, steps, ps, p_ok, P, EVENT)
    skip_d = tl.load(skip + ds, mask=d_ok, other=0.0)
    g1, b1, g2, b2, gf, bf = norm_parameters(norm1_g, norm1_b, norm2_g, norm2_b, final_g, final_b, ds, d_ok)
    fd_mask = f_ok[:, None] & d_ok[None, :]
    w_value = weight_tile(up_w, fs[:, None] * D + ds[None, :], fd_mask)
    w_gate = weight_tile(up_w, (F + fs)[:, None] * D + ds[None, :], fd_mask)
    w_down_t = weight_tile(columns, (W + 2 * P + fs)[:, None] * D + ds[None, :], fd_mask)
    b_value = tl.load(up_b + fs, mask=f_ok, other=0.0)
    b_gate = tl.load(up_b + F + fs, mask=f_ok, other=0.0)
    mlp_bias = tl.load(down_b + ds, mask=d_ok, other=0.0)
    s_mask = ps < tl.where(row_ok, P, 0)  # (a scalar & a vector of int1 is an int vector in the interpreter)
    s_re = tl.load(state_row + ps, mask=s_mask, other=0.0)
    s_im = tl.load(state_row + P + ps, mask=s_mask, other=0.0)
    x = tl.load(out_row + ws, mask=x_ok, other=0.0)
    for t in range(n_steps):
        if EVENT:
            dt = tl.load(dt_row + t, mask=row_ok, other=1.0)
            decay_re, decay_im, scale_re, scale_im = discretize(dt, a_re, a_im, k_re, k_im, delta, RULE)
        else:
            decay_re, decay_im, scale_re, scale_im = a_re, a_im, k_re, k_im
        h = rows_product(x, enc_t) + enc_bias
        a = normalize_columns(h, g1, b1, d_ok, D, eps)
        u_re = columns_product(a, b_re)
        u_im = columns_product(a, b_im)
        s_re, s_im = advance_modes(u_re, u_im, s_re, s_im, decay_re, decay_im, scale_re, scale_im, HAS_SCALE)
        h = h + row_sum(c_re_t * s_re[:, None] + c_im_t * s_im[:, None], axis=0) + skip_d * a
        a = normalize_columns(h, g2, b2, d_ok, D, eps)
        hidden = (columns_product(a, w_value) + b_value) * gelu(columns_product(a, w_gate) + b_gate)
        h = h + (rows_product(hidden, w_down_t) + mlp_bias)
        a = normalize_columns(h, gf, bf, d_ok, D, eps)
        x = columns_product(a, dec) + dec_bias
        tl.store(out_row + (t + 1) * out_stride_t + ws, x, mask=x_ok)
    tl.debug_barrier()  # every thread read its copy of the state (before the first step) before any writes
    tl.store(state_row + ps, s_re, mask=s_mask)
    tl.store(state_row + P + ps, s_im, mask=s_mask)
