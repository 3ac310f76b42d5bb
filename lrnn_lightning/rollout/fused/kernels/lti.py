"""Triton steps of the diagonal complex LTI mixers: LRU and S5 (modal, dense B and C) and S4D (per channel).

Discretisation, per mode, from a unit-dt exponent zeta (= Delta * Lambda, or LRU's
log lambda), the continuous eigenvalue lam and the step Delta:

    z = dt * zeta;  RULE 0 (dirac / LRU): decay = exp(z), no input scale
                    RULE 1 (zoh):         decay = exp(z), scale = expm1(z) / lam
                    RULE 2 (bilinear):    decay = (1 + z/2) / (1 - z/2), scale = dt * Delta / (1 - z/2)

Without event timesteps the decay and scale are precomputed by the model's own
`_discretize` (from the live parameters, at every launch) and only loaded here.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.common import complex_div, complex_exp, complex_expm1, row_sum


@triton.jit
def discretize(dt, zeta_re, zeta_im, lam_re, lam_im, step, RULE: tl.constexpr):
    """Per-mode (decay_re, decay_im, scale_re, scale_im) for timesteps dt broadcast against the mode tensors."""
    z_re = dt * zeta_re
    z_im = dt * zeta_im
    if RULE == 2:
        half_re = 0.5 * z_re
        half_im = 0.5 * z_im
        decay_re, decay_im = complex_div(1.0 + half_re, half_im, 1.0 - half_re, -half_im)
        scale_re, scale_im = complex_div(dt * step, 0.0 * z_re, 1.0 - half_re, -half_im)
    else:
        decay_re, decay_im = complex_exp(z_re, z_im)
        if RULE == 1:
            num_re, num_im = complex_expm1(z_re, z_im)
            scale_re, scale_im = complex_div(num_re, num_im, lam_re, lam_im)
        else:
            scale_re = 1.0 + 0.0 * z_re
            scale_im = 0.0 * z_re
    return decay_re, decay_im, scale_re, scale_im


@triton.jit
def mode_coefficients(dt, coef_a_ptr, coef_b_ptr, step_ptr, ps, p_ok, P, RULE: tl.constexpr, EVENT: tl.constexpr):
    """(decay_re, decay_im, scale_re, scale_im) of the modes ps (BP,) of LRU / S5: (1, BP), or (BB, BP) with EVENT.

    With EVENT, coef_a is zeta (2, P) and coef_b is lam (2, P), step (P,) is Delta, discretised
    here for the timesteps dt (BB,); else coef_a is the decay (2, P) and coef_b the input scale.
    """
    a_re, a_im, b_re, b_im, step = load_coefficients(coef_a_ptr, coef_b_ptr, step_ptr, ps, p_ok, P, EVENT)
    if EVENT:
        return discretize(dt[:, None], a_re, a_im, b_re, b_im, step, RULE)
    else:
        return a_re, a_im, b_re, b_im


@triton.jit
def load_coefficients(coef_a_ptr, coef_b_ptr, step_ptr, ps, p_ok, P, EVENT: tl.constexpr):
    """`mode_coefficients`' inputs for the modes ps, each (1, BP): coef_a and coef_b as (re, im), and Delta
    (0 without EVENT). A padded mode's coef_b is 1: with EVENT it is lam, which ZOH divides by."""
    a_re = tl.load(coef_a_ptr + ps, mask=p_ok, other=0.0)[None, :]
    a_im = tl.load(coef_a_ptr + P + ps, mask=p_ok, other=0.0)[None, :]
    b_re = tl.load(coef_b_ptr + ps, mask=p_ok, other=1.0)[None, :]
    b_im = tl.load(coef_b_ptr + P + ps, mask=p_ok, other=0.0)[None, :]
    if EVENT:
        step = tl.load(step_ptr + ps, mask=p_ok, other=0.0)[None, :]
    else:
        step = 0.0 * a_re
    return a_re, a_im, b_re, b_im, step


@triton.jit
def advance_modes(u_re, u_im, h_re, h_im, decay_re, decay_im, scale_re, scale_im, HAS_SCALE: tl.constexpr):
    """decay * h + scale * u for complex modes given as (re, im) pairs -> (new_re, new_im)."""
    if HAS_SCALE:
        u_re, u_im = u_re * scale_re - u_im * scale_im, u_im * scale_re + u_re * scale_im
    return u_re + decay_re * h_re - decay_im * h_im, u_im + decay_re * h_im + decay_im * h_re


@triton.jit
def modal_update(u_ptr, u_stride, s_ptr, s_stride, P, dt, row_ok, coef_a_ptr, coef_b_ptr, step_ptr,
                 RULE: tl.constexpr, EVENT: tl.constexpr, HAS_SCALE: tl.constexpr,
                 BB: tl.constexpr, BP: tl.constexpr):
    """h <- decay * h + scale * u for the P complex modes of LRU / S5, in place.

    u (BB, 2P) holds [Re(B x), Im(B x)]; the state s (BB, 2P) holds [h_re, h_im]; the
    coefficients are as in `mode_coefficients`; dt (BB,) is the step's timestep.
    """
    rows = tl.arange(0, BB)
    for p0 in range(0, P, BP):
        ps = p0 + tl.arange(0, BP)
        p_ok = ps < P
        mask = row_ok[:, None] & p_ok[None, :]
        u_re = tl.load(u_ptr + rows[:, None] * u_stride + ps[None, :], mask=mask, other=0.0)
        u_im = tl.load(u_ptr + rows[:, None] * u_stride + (P + ps)[None, :], mask=mask, other=0.0)
        decay_re, decay_im, scale_re, scale_im = mode_coefficients(dt, coef_a_ptr, coef_b_ptr, step_ptr, ps, p_ok, P,
                                                                   RULE, EVENT)
        h_re = tl.load(s_ptr + rows[:, None] * s_stride + ps[None, :], mask=mask, other=0.0)
        h_im = tl.load(s_ptr + rows[:, None] * s_stride + (P + ps)[None, :], mask=mask, other=0.0)
        new_re, new_im = advance_modes(u_re, u_im, h_re, h_im, decay_re, decay_im, scale_re, scale_im, HAS_SCALE)
        tl.debug_barrier()  # threads holding copies of one element must all read it before anyone writes
        tl.store(s_ptr + rows[:, None] * s_stride + ps[None, :], new_re, mask=mask)
        tl.store(s_ptr + rows[:, None] * s_stride + (P + ps)[None, :], new_im, mask=mask)


@triton.jit
def s4d_step(x_ptr, x_stride, res_ptr, out_ptr, h_stride, s_ptr, s_stride, D, N, dt, row_ok,
             coef_a_ptr, coef_b_ptr, c_ptr, skip_ptr,
             EVENT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BM: tl.constexpr):
    """One S4D step on a tile: out = res + 2 Re(sum_n C h) + D_skip x, with h <- decay h + scale x per channel.

    x (BB, D) is the normalised input, res and out (BB, D) the residual stream (stride h_stride).
    The state s (BB, 2, D, N) holds h_re then h_im per row (row stride s_stride). With EVENT,
    coef_a is zeta = Delta A and coef_b is A, each (2, D, N); else the decay and the input
    scale. C (2, D, N), skip (D,). Channels go BH at a time, modes BM at a time.
    """
    rows = tl.arange(0, BB)
    plane = D * N
    for h0 in range(0, D, BH):
        hs = h0 + tl.arange(0, BH)
        h_ok = hs < D
        mask2 = row_ok[:, None] & h_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + hs[None, :], mask=mask2, other=0.0)
        readout = tl.full((BB, BH), 0.0, tl.float32)
        for m0 in range(0, N, BM):
            ms = m0 + tl.arange(0, BM)
            param_ok = h_ok[:, None] & (ms < N)[None, :]
            param = hs[:, None] * N + ms[None, :]  # (BH, BM)
            a_re = tl.load(coef_a_ptr + param, mask=param_ok, other=0.0)[None, :, :]
            a_im = tl.load(coef_a_ptr + plane + param, mask=param_ok, other=0.0)[None, :, :]
            b_re = tl.load(coef_b_ptr + param, mask=param_ok, other=1.0)[None, :, :]
            b_im = tl.load(coef_b_ptr + plane + param, mask=param_ok, other=0.0)[None, :, :]
            if EVENT:
                decay_re, decay_im, scale_re, scale_im = discretize(dt[:, None, None], a_re, a_im, b_re, b_im,
                                                                    0.0, 1)
            else:
                decay_re, decay_im, scale_re, scale_im = a_re, a_im, b_re, b_im
            mask3 = row_ok[:, None, None] & param_ok[None, :, :]
            state = s_ptr + rows[:, None, None] * s_stride + param[None, :, :]
            h_re = tl.load(state, mask=mask3, other=0.0)
            h_im = tl.load(state + plane, mask=mask3, other=0.0)
            x3 = x[:, :, None]
            new_re = x3 * scale_re + decay_re * h_re - decay_im * h_im
            new_im = x3 * scale_im + decay_re * h_im + decay_im * h_re
            tl.debug_barrier()  # see modal_update
            tl.store(state, new_re, mask=mask3)
            tl.store(state + plane, new_im, mask=mask3)
            c_re = tl.load(c_ptr + param, mask=param_ok, other=0.0)[None, :, :]
            c_im = tl.load(c_ptr + plane + param, mask=param_ok, other=0.0)[None, :, :]
            readout += row_sum(new_re * c_re - new_im * c_im, axis=2)
        skip = tl.load(skip_ptr + hs, mask=h_ok, other=0.0)[None, :]
        res = tl.load(res_ptr + rows[:, None] * h_stride + hs[None, :], mask=mask2, other=0.0)
        tl.store(out_ptr + rows[:, None] * h_stride + hs[None, :], res + (x * skip + 2.0 * readout), mask=mask2)
