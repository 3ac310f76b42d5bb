"""The register-resident fused rollout of LRU, S5 and Mamba models: activations never leave the registers.

The scratch kernel (`rollout.py`) passes every activation through a per-program memory area
with a barrier between stages: about ten dependent memory round trips per layer per step,
which made it latency-bound (13 µs/step at (32, 32, 16, 1) on an H100, where the step's
arithmetic is well under a microsecond). Here one program keeps its BB rows' residual
stream h (BB, D) in registers for the whole rollout, and each matmul whose output feeds
another is fused with it block by block, so no intermediate is ever materialised:

    per layer:  a = LN1(h)
                for each block of modes p:   u_p = B_p a;  s_p = decay_p s_p + scale_p u_p   (state in memory)
                                             y += C_p s_p                    (LRU / S5; Mamba: register_mamba.py)
                h = h + y + D_skip a;  a = LN2(h)
                for each block of hidden units f:   g_f = (Wv_f a + bv_f) * gelu(Wg_f a + bg_f)
                                                    z += Wdown_f g_f
                h = h + z + b_down
    x = decoder(LN_final(h))  -> written out and fed back in registers

Only the recurrent state (read and written once per mode block per step) and the weights
(read per block, from L1/L2) touch memory. The price is that D (and the input width W)
must fit one register tile: `launch.registers_fit` decides, and wider models take the
scratch kernel. With one row a program (`config.default_config` at small batch) every
product runs in the weight tile's own layout (`common.small_product`), which made the
(32, 128, 64, 4) LRU step 2.7x faster than a 3-D broadcast product (RESULTS.md). With SPLIT > 1
several programs share a row tile's step, each taking every SPLIT-th block of modes, Mamba
channels and hidden units, and exchange their partial sums (group.py). A one-layer
LRU / S5 model whose modes and hidden units each fit one block runs `resident.py` instead
(RESIDENT): its weights and state stay in registers from the first step to the last.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.blocks import mlp_block, mlp_tiles, modal_block, mode_tiles, normalize
from lrnn_lightning.rollout.fused.kernels.common import product
from lrnn_lightning.rollout.fused.kernels.group import group_sum
from lrnn_lightning.rollout.fused.kernels.lti import mode_coefficients
from lrnn_lightning.rollout.fused.kernels.register_mamba import mamba_mixer
from lrnn_lightning.rollout.fused.kernels.resident import resident_modal_steps, resident_row_steps


@triton.jit
def modal_mixer(a, state, s_stride, rows, row_ok, dt, D, P, win, readout, coef_a, coef_b, steps, rank,
                RULE: tl.constexpr, EVENT: tl.constexpr, HAS_SCALE: tl.constexpr, BB: tl.constexpr,
                BD: tl.constexpr, BP: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr, PREC: tl.constexpr,
                W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """C s' (BB, BD) for the normalised input a (BB, BD), with s' = decay s + scale B a per mode, in place.

    Only rank's mode blocks (every SPLIT-th, group.py): the result is this rank's partial sum.

    win (2P, D) is B as [Re; Im] rows, readout (D, 2P) the real map [C_re, -C_im] (times
    LRU's output scale); the state (BB, 2P) at `state` holds [s_re, s_im] per row; the
    coefficients are as in `lti.mode_coefficients`.
    """
    y = tl.full((BB, BD), 0.0, tl.float32)
    for p0 in range(rank * BP, P, BP * SPLIT):
        ps = p0 + tl.arange(0, BP)
        p_ok = ps < P
        b_re, b_im, c_re, c_im = mode_tiles(win, readout, D, P, p0, BD, BP, CHUNK)
        decay_re, decay_im, scale_re, scale_im = mode_coefficients(dt, coef_a, coef_b, steps, ps, p_ok, P, RULE,
                                                                   EVENT)
        s_mask = row_ok[:, None] & p_ok[None, :]
        s_re_ptr = state + rows[:, None] * s_stride + ps[None, :]
        s_re = tl.load(s_re_ptr, mask=s_mask, other=0.0)
        s_im = tl.load(s_re_ptr + P, mask=s_mask, other=0.0)
        y_block, new_re, new_im = modal_block(a, b_re, b_im, c_re, c_im, s_re, s_im, decay_re, decay_im, scale_re,
                                              scale_im, HAS_SCALE, BB, CHUNK, PREC, W_BF16, EMULATE_BF16)
        tl.debug_barrier()  # threads holding copies of one state element must all read it before anyone writes
        tl.store(s_re_ptr, new_re, mask=s_mask)
        tl.store(s_re_ptr + P, new_im, mask=s_mask)
        y += y_block
    return y


@triton.jit
def gated_mlp(a, D, F, up_w, up_b, down_w, w_value, w_gate, w_down, b_value, b_gate, rank,
              BB: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr,
              PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Wdown ((Wv a + bv) * gelu(Wg a + bg)) (BB, BD) without its bias; up (2F, D) holds Wv then Wg, down (D, F).

    Only rank's blocks of hidden units (every SPLIT-th, group.py): the result is its partial sum.
    w_value .. b_gate are rank's first block's tiles (`mlp_tiles(.., rank * BF)`), loaded by the
    caller ahead of time; each iteration loads the next block's tiles before it computes, so
    that one block's weights stream in while the previous one is multiplied.
    """
    z = tl.full((BB, BD), 0.0, tl.float32)
    for f0 in range(rank * BF, F, BF * SPLIT):
        n_value, n_gate, n_down, nb_value, nb_gate = mlp_tiles(up_w, up_b, down_w, D, F, f0 + BF * SPLIT, BD, BF,
                                                                       CHUNK)
        z += mlp_block(a, w_value, w_gate, w_down, b_value, b_gate, BB, CHUNK, PREC, W_BF16, EMULATE_BF16)
        w_value, w_gate, w_down, b_value, b_gate = n_value, n_gate, n_down, nb_value, nb_gate
    return z


# batch, horizon and strides vary from call to call (see rollout.py); the widths stay specialised
@triton.jit(do_not_specialize=["out_stride_b", "out_stride_t", "dt_stride_b", "state_stride_layer", "B", "n_steps"])
def register_rollout_kernel(
    out_ptr, out_stride_b, out_stride_t, dt_ptr, dt_stride_b,
    state_ptr, state_stride_layer, state_stride_row, scratch_ptr, part_ptr, sem_ptr, columns_ptr,
    enc_w, enc_b, dec_w, dec_b, final_g, final_b,
    norm1_g, norm1_b, norm2_g, norm2_b, up_w, up_b, down_w, down_b,
    m0, m1, m2, m3, m4, m5, m6, m7, m8,
    B, n_steps, W: tl.constexpr, D: tl.constexpr, F: tl.constexpr, n_layers: tl.constexpr, md0: tl.constexpr,
    md1: tl.constexpr, md2: tl.constexpr, md3: tl.constexpr, eps,
    MIXER: tl.constexpr, RULE: tl.constexpr, EVENT: tl.constexpr, HAS_SCALE: tl.constexpr,
    BB: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    BP: tl.constexpr, BE: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BKC: tl.constexpr,
    SPLIT: tl.constexpr, TAGGED: tl.constexpr, BX: tl.constexpr, PREC: tl.constexpr, W_BF16: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    RESIDENT: tl.constexpr, CHUNK: tl.constexpr,
):
    """Grid (cdiv(B, BB) * SPLIT,): SPLIT programs a row tile (group.py). out (B, n_steps + 1, W) holds x0 in
    column 0 and receives step t's output in column t + 1; dt (B, n_steps) fp32 when EVENT; state (L, row
    tiles * BB, state width) fp32, updated in place; scratch (programs * BB, md0) fp32 for Mamba's conv
    outputs; part (row tiles, 2, SPLIT, BB, BX) int64 and sem (row tiles,) int32, zeroed, for the exchanges
    of a split step (unused when SPLIT is 1; TAGGED picks their protocol, group.py); columns (W + 2P + F, D),
    the transposed encoder, readout and down-projection (`pack.transposed_columns`; read only when RESIDENT
    is 2); weights and mixer slots m0..m8, md0..md3 as packed by `pack_model`. MIXER 0: LRU / S5
    (`modal_mixer`, BP), 2: Mamba (`mamba_mixer`, BE, BR, BN, BKC). RESIDENT (MIXER 0, one layer, P <= BP,
    F <= BF, SPLIT 1, weight tiles within the register budget; `launch.resident_fits`): 1
    `resident_modal_steps`, 2 (one row a program) `resident_row_steps`. CHUNK (one row a program, not resident;
    else 0): the chunk width of the mode and MLP weight tiles (`common.load_tile`; 0 loads them flat)."""
    pid = tl.program_id(0)
    tile = pid // SPLIT
    rank = pid % SPLIT
    rows = tile * BB + tl.arange(0, BB)
    row_ok = rows < B
    rows = rows.to(tl.int64)
    slots = (pid * BB + tl.arange(0, BB)).to(tl.int64)  # this program's rows of the Mamba scratch
    part = part_ptr + tile.to(tl.int64) * (2 * SPLIT * BB * BX)
    sem = sem_ptr + tile
    exchanges = 2 if MIXER == 0 else 3  # per layer (see below)
    ws = tl.arange(0, BW)
    w_ok = ws < W
    ds = tl.arange(0, BD)
    d_ok = ds < D
    io_mask = row_ok[:, None] & w_ok[None, :]
    writer = (tl.full((BB,), 0, tl.int32) + rank) == 0  # every rank holds the output; rank 0 writes it
    out_rows = out_ptr + rows[:, None] * out_stride_b + ws[None, :]
    # the encoder and decoder are the same at every step: loaded once, kept in registers
    enc = tl.load(enc_w + ds[:, None] * W + ws[None, :], mask=d_ok[:, None] & w_ok[None, :], other=0.0)
    enc_bias = tl.load(enc_b + ds, mask=d_ok, other=0.0)[None, :]
    dec = tl.load(dec_w + ws[:, None] * D + ds[None, :], mask=w_ok[:, None] & d_ok[None, :], other=0.0)
    dec_bias = tl.load(dec_b + ws, mask=w_ok, other=0.0)[None, :]
    x = tl.load(out_rows, mask=io_mask, other=0.0)
    if RESIDENT == 2:  # one layer, one block of modes and of hidden units, one row: vectors
        row = tile.to(tl.int64)
        resident_row_steps(out_ptr + row * out_stride_b, out_stride_t, dt_ptr + row * dt_stride_b,
                           row < B, state_ptr + row * state_stride_row, columns_ptr, enc_b, dec_w, dec_b, final_g,
                           final_b, norm1_g, norm1_b, norm2_g, norm2_b, up_w, up_b, down_b, m0, m2, m3, m4, m5,
                           n_steps, W, D, F, md0, eps, RULE, EVENT, HAS_SCALE, BW, BD, BP, BF)
    elif RESIDENT == 1:  # one layer, one block of modes and of hidden units: weights and state stay in registers
        resident_modal_steps(x, out_rows, out_stride_t, io_mask, dt_ptr, dt_stride_b, rows, row_ok, state_ptr,
                             state_stride_row, enc, enc_bias, dec, dec_bias, final_g, final_b, norm1_g, norm1_b,
                             norm2_g, norm2_b, up_w, up_b, down_w, down_b, m0, m1, m2, m3, m4, m5, n_steps, D, F, md0,
                             eps, RULE, EVENT, HAS_SCALE, BB, BD, BP, BF, PREC, W_BF16, EMULATE_BF16)
    else:
        for t in range(n_steps):
            # the state a thread reads this step may have been written by another thread last step: explicit,
            # rather than relying on the barriers Triton happens to emit for its layout conversions
            tl.debug_barrier()
            if EVENT:
                dt = tl.load(dt_ptr + rows * dt_stride_b + t, mask=row_ok, other=1.0)
            else:
                dt = tl.full((BB,), 1.0, tl.float32)
            h = product(x, enc, BB, PREC, W_BF16, EMULATE_BF16) + enc_bias
            state = state_ptr
            for layer in range(n_layers):
                layer_up_w = up_w + layer * (2 * F * D)
                layer_up_b = up_b + layer * (2 * F)
                layer_down_w = down_w + layer * (D * F)
                # running number of this layer's first exchange: its parity picks the buffer and exchange + 1 is
                # its tag (group.py); both survive int32 wrap-around on very long rollouts
                exchange = (t * n_layers + layer) * exchanges
                # the MLP's first weight block is loaded now, to arrive while the mixer runs
                w_value, w_gate, w_down, b_value, b_gate = mlp_tiles(layer_up_w, layer_up_b, layer_down_w, D, F,
                                                                     rank * BF, BD, BF, CHUNK)
                a = normalize(h, norm1_g + layer * D, norm1_b + layer * D, D, eps, BD)
                if MIXER == 0:
                    P = md0
                    y = modal_mixer(a, state, state_stride_row, rows, row_ok, dt, D, P, m0 + layer * (2 * P * D),
                                    m1 + layer * (2 * P * D), m3 + layer * (2 * P), m4 + layer * (2 * P),
                                    m5 + layer * P, rank, RULE, EVENT, HAS_SCALE, BB, BD, BP, SPLIT, CHUNK, PREC,
                                    W_BF16, EMULATE_BF16)
                    y = group_sum(y, part, sem, rank, exchange, SPLIT, TAGGED, BB, BD, BX)
                    y += tl.load(m2 + layer * D + ds, mask=d_ok, other=0.0)[None, :] * a
                else:
                    # the selection exchange takes the counter, whose fp32 values would corrupt tagged words
                    tl.static_assert(not TAGGED, "Mamba's split steps exchange through the counter (group.py)")
                    y = mamba_mixer(a, state, state_stride_row, scratch_ptr, slots, rows, row_ok, dt, layer, D,
                                    md0, md1, md2, md3, m0, m1, m2, m3, m4, m5, m6, m7, m8, rank, part, sem, exchange,
                                    EVENT, BB, BD, BE, BR, BN, BKC, SPLIT, BX, PREC, W_BF16, EMULATE_BF16)
                    y = group_sum(y, part, sem, rank, exchange + 1, SPLIT, TAGGED, BB, BD, BX)
                h = h + y
                a = normalize(h, norm2_g + layer * D, norm2_b + layer * D, D, eps, BD)
                z = gated_mlp(a, D, F, layer_up_w, layer_up_b, layer_down_w, w_value, w_gate, w_down, b_value, b_gate,
                              rank, BB, BD, BF, SPLIT, CHUNK, PREC, W_BF16, EMULATE_BF16)
                z = group_sum(z, part, sem, rank, exchange + exchanges - 1, SPLIT, TAGGED, BB, BD, BX)
                h = h + (z + tl.load(down_b + layer * D + ds, mask=d_ok, other=0.0)[None, :])
                state += state_stride_layer  # a pointer step: (layer * stride) could overflow int32
            a = normalize(h, final_g, final_b, D, eps, BD)
            x = product(a, dec, BB, PREC, W_BF16, EMULATE_BF16) + dec_bias
            tl.store(out_rows + (t + 1) * out_stride_t, x, mask=io_mask & writer[:, None])
