"""Mamba's step for the register-resident kernel (registers.py): activations in registers, blocks of channels.

One step of a Mamba mixer on the normalised input a (BB, D), over the E inner channels in
blocks of BE, in two passes because the selection (Delta's low-rank input, B and C)
sums over every channel's conv output:

    pass 1, per block e:  x_e = W_in[x] a;  u_e = silu(conv(window_e, x_e))  (window shifted in place)
                          dt_low += W_x[dt] u_e;  B += W_x[B] u_e;  C += W_x[C] u_e;  u_e -> scratch
    pass 2, per block e:  z_e = W_in[z] a;  delta_e = softplus(W_dt dt_low + b_dt)
                          h_e = exp(delta_e A_e) h_e + delta_e u_e B      (exp(dt A_e) with event dt)
                          y += W_out[:, e] ((h_e C + D_skip u_e) silu(z_e))

as `Mamba.step` computes it. The conv window and h live in the row's state (conv window
(E, KC-1) oldest first, then h (E, N)); u crosses from pass 1 to pass 2 through the
program's scratch rows (one barrier), everything else stays in registers. In a split step
(group.py) each rank takes every SPLIT-th block of channels, in both passes, and the ranks
add up their selection sums between the passes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.common import product, row_sum, silu, softplus
from lrnn_lightning.rollout.fused.kernels.group import exchange_slot, gather, group_barrier, publish
from lrnn_lightning.rollout.fused.kernels.ltv import conv_window_step


@triton.jit
def mamba_mixer(a, state, s_stride, scratch, slots, rows, row_ok, dt, layer, D, E, N, R, KC,
                in_w, conv_w, conv_b, x_w, dt_w, dt_b, a_mat, d_skip, out_w, rank, part, sem, exchange,
                EVENT: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BR: tl.constexpr,
                BN: tl.constexpr, BKC: tl.constexpr, SPLIT: tl.constexpr, BX: tl.constexpr, PREC: tl.constexpr,
                W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Mamba(a) (BB, BD) for one step, the state updated in place.

    Weights (stacked over layers, `layer` selects): in_w (2E, D), conv_w (E, KC), conv_b (E,),
    x_w (R+2N, E), dt_w (E, R), dt_b (E,), a_mat = -exp(A_log) (E, N), d_skip (E,), out_w (D, E).
    scratch (programs * BB, E) holds u between the passes, this program's rows at `slots`; dt (BB,) is the
    step's event timestep; rank, part, sem and exchange as in group.py, whose counter protocol it uses (the
    result is rank's partial sum). The next layer's pass 1 overwrites the scratch rows only after the barrier
    in this layer's last pass-2 block, so every thread has read its u by then.
    """
    in_w += layer * (2 * E * D)
    conv_w += layer * (E * KC)
    conv_b += layer * E
    x_w += layer * ((R + 2 * N) * E)
    dt_w += layer * (E * R)
    dt_b += layer * E
    a_mat += layer * (E * N)
    d_skip += layer * E
    out_w += layer * (D * E)
    ds = tl.arange(0, BD)
    d_ok = ds < D
    rs = tl.arange(0, BR)
    r_ok = rs < R
    ns = tl.arange(0, BN)
    n_ok = ns < N
    taps = tl.arange(0, BKC)
    keep = KC - 1

    dt_low = tl.full((BB, BR), 0.0, tl.float32)
    b_sel = tl.full((BB, BN), 0.0, tl.float32)
    c_sel = tl.full((BB, BN), 0.0, tl.float32)
    for e0 in range(rank * BE, E, BE * SPLIT):
        es = e0 + tl.arange(0, BE)
        e_ok = es < E
        x_e = product(a, tl.load(in_w + es[:, None] * D + ds[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0),
                      BB, PREC, W_BF16, EMULATE_BF16)
        window = state + rows[:, None, None] * s_stride + es[None, :, None] * keep + taps[None, None, :]
        weight = tl.load(conv_w + es[:, None] * KC + taps[None, :], mask=e_ok[:, None] & (taps < KC)[None, :],
                         other=0.0)
        mask3 = row_ok[:, None, None] & e_ok[None, :, None]
        u_e = silu(conv_window_step(window, mask3, taps, keep, x_e, weight)
                   + tl.load(conv_b + es, mask=e_ok, other=0.0)[None, :])
        tl.store(scratch + slots[:, None] * E + es[None, :], u_e, mask=row_ok[:, None] & e_ok[None, :])
        x_cols = x_w + es[None, :]
        dt_low += product(u_e, tl.load(x_cols + rs[:, None] * E, mask=r_ok[:, None] & e_ok[None, :], other=0.0),
                          BB, PREC, W_BF16, EMULATE_BF16)
        sel_mask = n_ok[:, None] & e_ok[None, :]
        b_sel += product(u_e, tl.load(x_cols + (R + ns)[:, None] * E, mask=sel_mask, other=0.0),
                         BB, PREC, W_BF16, EMULATE_BF16)
        c_sel += product(u_e, tl.load(x_cols + (R + N + ns)[:, None] * E, mask=sel_mask, other=0.0),
                         BB, PREC, W_BF16, EMULATE_BF16)
    tl.debug_barrier()  # u goes through scratch to whichever thread holds it in pass 2
    if SPLIT > 1:  # the selection sums over every channel: add up the ranks' parts
        slot = exchange_slot(part, exchange, SPLIT, False, BB, BX)
        publish(dt_low, slot, rank, 0, BB, BR, BX)
        publish(b_sel, slot, rank, BR, BB, BN, BX)
        publish(c_sel, slot, rank, BR + BN, BB, BN, BX)
        group_barrier(sem, rank, SPLIT)
        dt_low = gather(slot, 0, SPLIT, BB, BR, BX)
        b_sel = gather(slot, BR, SPLIT, BB, BN, BX)
        c_sel = gather(slot, BR + BN, SPLIT, BB, BN, BX)

    y = tl.full((BB, BD), 0.0, tl.float32)
    h_rows = state + keep * E + rows[:, None, None] * s_stride
    for e0 in range(rank * BE, E, BE * SPLIT):
        es = e0 + tl.arange(0, BE)
        e_ok = es < E
        row_mask = row_ok[:, None] & e_ok[None, :]
        u_e = tl.load(scratch + slots[:, None] * E + es[None, :], mask=row_mask, other=0.0)
        z_e = product(a, tl.load(in_w + (E + es)[:, None] * D + ds[None, :], mask=e_ok[:, None] & d_ok[None, :],
                                 other=0.0), BB, PREC, W_BF16, EMULATE_BF16)
        w_dt = tl.load(dt_w + es[:, None] * R + rs[None, :], mask=e_ok[:, None] & r_ok[None, :], other=0.0)
        delta = softplus(product(dt_low, w_dt, BB, PREC, W_BF16, EMULATE_BF16)
                         + tl.load(dt_b + es, mask=e_ok, other=0.0)[None, :])
        param_mask = (e_ok[:, None] & n_ok[None, :])[None, :, :]
        rates = tl.load(a_mat + es[None, :, None] * N + ns[None, None, :], mask=param_mask, other=0.0)
        if EVENT:
            decay = tl.exp(dt[:, None, None] * rates)
        else:
            decay = tl.exp(delta[:, :, None] * rates)
        cell = h_rows + es[None, :, None] * N + ns[None, None, :]
        cell_mask = row_ok[:, None, None] & param_mask
        h = tl.load(cell, mask=cell_mask, other=0.0)
        h = h * decay + (delta * u_e)[:, :, None] * b_sel[:, None, :]
        tl.debug_barrier()  # threads holding copies of one state element must all read it before anyone writes
        tl.store(cell, h, mask=cell_mask)
        y_e = row_sum(h * c_sel[:, None, :], axis=2) + tl.load(d_skip + es, mask=e_ok, other=0.0)[None, :] * u_e
        w_out = tl.load(out_w + ds[:, None] * E + es[None, :], mask=d_ok[:, None] & e_ok[None, :], other=0.0)
        y += product(y_e * silu(z_e), w_out, BB, PREC, W_BF16, EMULATE_BF16)
    return y
