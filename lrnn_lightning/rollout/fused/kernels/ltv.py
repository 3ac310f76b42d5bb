"""Triton steps of the time-varying mixers: Mamba (S6) and RG-LRU, each behind a depthwise causal conv.

The conv's state is the window of the last K-1 pre-conv inputs, oldest first, exactly as
`CausalConv1d.step` keeps it, so the prefill's state is loaded unchanged. Every mixer
writes its intermediates to the program's mixer scratch `m` (sub-buffers of BB rows).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.common import expm1, gelu, linear, row_sum, silu


@triton.jit
def conv_window_step(window, mask3, taps, keep, x, weight):
    """One causal-conv step of a (BB, BC) tile of channels, without the bias: sum_j w_j [window, x]_j.

    window: pointers (BB, BC, BKC) to each channel's KC-1 = `keep` past inputs, oldest first, plus
    the tap offsets `taps` (BKC,); mask3 (BB, BC, 1) the valid rows and channels; x (BB, BC) the
    new inputs; weight (BC, BKC) the taps' weights. The window is shifted in place to end with x.
    """
    old = tl.load(window, mask=mask3 & (taps < keep)[None, None, :], other=0.0)
    old = tl.where((taps == keep)[None, None, :], x[:, :, None], old)
    y = row_sum(old * weight[None, :, :], axis=2)
    shifted = tl.load(window + 1, mask=mask3 & (taps + 1 < keep)[None, None, :], other=0.0)
    shifted = tl.where((taps + 1 == keep)[None, None, :], x[:, :, None], shifted)
    tl.debug_barrier()  # every thread has read the old window before it is overwritten
    tl.store(window, shifted, mask=mask3 & (taps < keep)[None, None, :])
    return y


@triton.jit
def conv_step(x_ptr, x_stride, win_ptr, win_stride, w_ptr, b_ptr, C, KC, out_ptr, out_stride, row_ok,
              SILU: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, BKC: tl.constexpr):
    """y = b + sum_j w_j taps_j with taps = [window, x]; the window (BB, C, KC-1) shifts in place to end with x."""
    rows = tl.arange(0, BB)
    taps_idx = tl.arange(0, BKC)
    keep = KC - 1
    for c0 in range(0, C, BC):
        cs = c0 + tl.arange(0, BC)
        c_ok = cs < C
        mask2 = row_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cs[None, :], mask=mask2, other=0.0)
        window = win_ptr + rows[:, None, None] * win_stride + cs[None, :, None] * keep + taps_idx[None, None, :]
        weight = tl.load(w_ptr + cs[:, None] * KC + taps_idx[None, :], mask=c_ok[:, None] & (taps_idx < KC)[None, :],
                         other=0.0)
        y = conv_window_step(window, mask2[:, :, None], taps_idx, keep, x, weight) \
            + tl.load(b_ptr + cs, mask=c_ok, other=0.0)[None, :]
        if SILU:
            y = silu(y)
        tl.store(out_ptr + rows[:, None] * out_stride + cs[None, :], y, mask=mask2)


@triton.jit
def mamba_step(a, h_in, h_out, D, m, state, s_stride, dt, row_ok, layer,
               in_w, conv_w, conv_b, x_w, dt_w, dt_b, a_mat, d_skip, out_w, E, N, R, KC,
               EVENT: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
               BX: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BKC: tl.constexpr,
               PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """h_out = h_in + Mamba(a) for one step; state per row: conv window (E, KC-1), then h (E, N).

    Weights (stacked over layers): in_w (2E, D), conv_w (E, KC), conv_b (E,), x_w (R+2N, E),
    dt_w (E, R), dt_b (E,), a_mat = -exp(A_log) (E, N), d_skip (E,), out_w (D, E).
    Scratch: xz (BB, 2E), u (BB, E), xp (BB, R+2N), delta (BB, E), y (BB, E).
    """
    XW = R + 2 * N
    xz = m
    u = xz + BB * 2 * E
    xp = u + BB * E
    delta = xp + BB * XW
    y = delta + BB * E
    linear(a, D, in_w + layer * (2 * E * D), in_w, D, 2 * E, xz, 2 * E, row_ok,
           xz, 2 * E, xz, 2 * E, d_skip, False, False, False, 0, BB, BE, BK, PREC, W_BF16, EMULATE_BF16)
    tl.debug_barrier()
    conv_step(xz, 2 * E, state, s_stride, conv_w + layer * (E * KC), conv_b + layer * E, E, KC, u, E, row_ok,
              True, BB, BE, BKC)
    tl.debug_barrier()
    linear(u, E, x_w + layer * (XW * E), x_w, E, XW, xp, XW, row_ok,
           xp, XW, xp, XW, d_skip, False, False, False, 0, BB, BX, BK, PREC, W_BF16, EMULATE_BF16)
    tl.debug_barrier()
    linear(xp, XW, dt_w + layer * (E * R), dt_b + layer * E, R, E, delta, E, row_ok,
           delta, E, delta, E, d_skip, True, False, False, 1, BB, BE, BK, PREC, W_BF16, EMULATE_BF16)
    tl.debug_barrier()

    rows = tl.arange(0, BB)
    ns = tl.arange(0, BN)
    n_ok = ns < N
    mask_n = row_ok[:, None] & n_ok[None, :]
    b_sel = tl.load(xp + rows[:, None] * XW + R + ns[None, :], mask=mask_n, other=0.0)
    c_sel = tl.load(xp + rows[:, None] * XW + R + N + ns[None, :], mask=mask_n, other=0.0)
    h_state = state + E * (KC - 1)
    a_layer = a_mat + layer * (E * N)
    for e0 in range(0, E, BS):
        es = e0 + tl.arange(0, BS)
        e_ok = es < E
        mask2 = row_ok[:, None] & e_ok[None, :]
        u_e = tl.load(u + rows[:, None] * E + es[None, :], mask=mask2, other=0.0)
        delta_e = tl.load(delta + rows[:, None] * E + es[None, :], mask=mask2, other=0.0)
        z_e = tl.load(xz + rows[:, None] * (2 * E) + E + es[None, :], mask=mask2, other=0.0)
        param_ok = e_ok[:, None] & n_ok[None, :]
        rates = tl.load(a_layer + es[:, None] * N + ns[None, :], mask=param_ok, other=0.0)[None, :, :]
        if EVENT:
            decay = tl.exp(dt[:, None, None] * rates)
        else:
            decay = tl.exp(delta_e[:, :, None] * rates)
        mask3 = row_ok[:, None, None] & param_ok[None, :, :]
        cell = h_state + rows[:, None, None] * s_stride + es[None, :, None] * N + ns[None, None, :]
        h = tl.load(cell, mask=mask3, other=0.0)
        h = h * decay + (delta_e * u_e)[:, :, None] * b_sel[:, None, :]
        tl.debug_barrier()  # see modal_update
        tl.store(cell, h, mask=mask3)
        skip = tl.load(d_skip + layer * E + es, mask=e_ok, other=0.0)[None, :]
        y_e = row_sum(h * c_sel[:, None, :], axis=2) + skip * u_e
        tl.store(y + rows[:, None] * E + es[None, :], y_e * silu(z_e), mask=mask2)
    tl.debug_barrier()
    linear(y, E, out_w + layer * (D * E), out_w, E, D, h_out, D, row_ok,
           h_in, D, h_in, D, d_skip, False, True, False, 0, BB, BD, BK, PREC, W_BF16, EMULATE_BF16)


@triton.jit
def rglru_step(a, h_in, h_out, D, m, state, s_stride, dt, row_ok, layer,
               in_w, in_b, conv_w, conv_b, gate_w, gate_b, log_a_base, out_w, out_b, Wd, KC,
               EVENT: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BWD: tl.constexpr,
               BKC: tl.constexpr,
               PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """h_out = h_in + RG-LRU block(a) for one step; state per row: conv window (Wd, KC-1), then h (Wd,).

    Weights (stacked over layers): in_w (2Wd, D), in_b (2Wd,), conv_w (Wd, KC), conv_b (Wd,),
    gate_w (2Wd, Wd), gate_b (2Wd,), log_a_base = c * logsigmoid(Lambda) (Wd,), out_w (D, Wd), out_b (D,).
    Scratch: xg (BB, 2Wd), u (BB, Wd), ri (BB, 2Wd), y (BB, Wd).
    """
    xg = m
    u = xg + BB * 2 * Wd
    ri = u + BB * Wd
    y = ri + BB * 2 * Wd
    linear(a, D, in_w + layer * (2 * Wd * D), in_b + layer * (2 * Wd), D, 2 * Wd, xg, 2 * Wd, row_ok,
           xg, 2 * Wd, xg, 2 * Wd, in_b, True, False, False, 0, BB, BWD, BK, PREC, W_BF16, EMULATE_BF16)
    tl.debug_barrier()
    conv_step(xg, 2 * Wd, state, s_stride, conv_w + layer * (Wd * KC), conv_b + layer * Wd, Wd, KC, u, Wd, row_ok,
              False, BB, BWD, BKC)
    tl.debug_barrier()
    linear(u, Wd, gate_w + layer * (2 * Wd * Wd), gate_b + layer * (2 * Wd), Wd, 2 * Wd, ri, 2 * Wd, row_ok,
           ri, 2 * Wd, ri, 2 * Wd, in_b, True, False, False, 2, BB, BWD, BK, PREC, W_BF16, EMULATE_BF16)
    tl.debug_barrier()

    rows = tl.arange(0, BB)
    h_state = state + Wd * (KC - 1)
    for w0 in range(0, Wd, BWD):
        ws = w0 + tl.arange(0, BWD)
        w_ok = ws < Wd
        mask = row_ok[:, None] & w_ok[None, :]
        r = tl.load(ri + rows[:, None] * (2 * Wd) + ws[None, :], mask=mask, other=0.0)
        i = tl.load(ri + rows[:, None] * (2 * Wd) + Wd + ws[None, :], mask=mask, other=0.0)
        u_w = tl.load(u + rows[:, None] * Wd + ws[None, :], mask=mask, other=0.0)
        gate = tl.load(xg + rows[:, None] * (2 * Wd) + Wd + ws[None, :], mask=mask, other=0.0)
        log_a = tl.load(log_a_base + layer * Wd + ws, mask=w_ok, other=0.0)[None, :] * r
        if EVENT:
            log_a = log_a * dt[:, None]
        normaliser = tl.sqrt_rn(-expm1(2.0 * log_a))
        cell = h_state + rows[:, None] * s_stride + ws[None, :]
        h = tl.load(cell, mask=mask, other=0.0)
        h = h * tl.exp(log_a) + normaliser * (i * u_w)
        tl.debug_barrier()  # see modal_update
        tl.store(cell, h, mask=mask)
        tl.store(y + rows[:, None] * Wd + ws[None, :], h * gelu(gate), mask=mask)
    tl.debug_barrier()
    linear(y, Wd, out_w + layer * (D * Wd), out_b + layer * D, Wd, D, h_out, D, row_ok,
           h_in, D, h_in, D, out_b, True, True, False, 0, BB, BD, BK, PREC, W_BF16, EMULATE_BF16)
