"""The whole-model-resident rollout of a one-layer LRU / S5 model: weights and state stay in registers.

The register kernel (registers.py) loads each weight tile and the recurrent state from
L1/L2 at every step, and each load is one more latency on the step's critical path. When
the model has one layer whose modes and MLP hidden units each fit one block (BP >= P,
BF >= F; `launch.resident_fits`), everything a step reads fits the registers of one
program: here all of it is loaded once, before the first step, the state is carried from
step to step in registers and written back after the last, and a step reads nothing from
memory but its event dt. The arithmetic is the register kernel's own (blocks.py), so the
numbers are the same.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.blocks import mlp_block, mlp_tiles, modal_block, mode_tiles, normalize_with
from lrnn_lightning.rollout.fused.kernels.common import product
from lrnn_lightning.rollout.fused.kernels.lti import discretize, load_coefficients


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
    b_re, b_im, c_re, c_im = mode_tiles(win, readout, D, P, ps, BD)
    a_re, a_im, k_re, k_im, delta = load_coefficients(coef_a, coef_b, steps, ps, p_ok, P, EVENT)
    skip_d = tl.load(skip + ds, mask=d_ok, other=0.0)[None, :]
    g1 = tl.load(norm1_g + ds, mask=d_ok, other=0.0)
    b1 = tl.load(norm1_b + ds, mask=d_ok, other=0.0)
    g2 = tl.load(norm2_g + ds, mask=d_ok, other=0.0)
    b2 = tl.load(norm2_b + ds, mask=d_ok, other=0.0)
    gf = tl.load(final_g + ds, mask=d_ok, other=0.0)
    bf = tl.load(final_b + ds, mask=d_ok, other=0.0)
    w_value, w_gate, w_down, b_value, b_gate = mlp_tiles(up_w, up_b, down_w, D, F, 0, BD, BF)
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
                                    HAS_SCALE, BB, PREC, W_BF16, EMULATE_BF16)
        h = h + y + skip_d * a
        a = normalize_with(h, g2, b2, D, eps, BD)
        h = h + (mlp_block(a, w_value, w_gate, w_down, b_value, b_gate, BB, PREC, W_BF16, EMULATE_BF16) + mlp_bias)
        a = normalize_with(h, gf, bf, D, eps, BD)
        x = product(a, dec, BB, PREC, W_BF16, EMULATE_BF16) + dec_bias
        tl.store(out_rows + (t + 1) * out_stride_t, x, mask=io_mask)
    tl.debug_barrier()  # every thread read its copy of the state (before the first step) before any writes
    tl.store(s_re_ptr, s_re, mask=s_mask)
    tl.store(s_re_ptr + P, s_im, mask=s_mask)
