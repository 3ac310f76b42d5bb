"""The scratch fused rollout kernel: T autoregressive steps of a whole `SequenceModel` in one launch.

This kernel passes activations between stages through per-program memory, so it runs every
covered mixer at any width; LRU, S5 and Mamba models that fit the register kernel's tiles run
`registers.register_rollout_kernel` instead (imported here, so one import gives both; see
`launch.registers_fit`). One program owns BB batch rows for the whole rollout: 1, 2, 4 or 8
(its matmuls then run without tl.dot, see common.py) or 16, 32, 64 (tl.dot);
`config.default_config` picks BB from the batch and the GPU's SM count. Per step:

    x = out[:, t]                                   (the previous output, fed back)
    h = encoder(x)                                  -> H0
    per layer l:  a = LN1(H0); H1 = H0 + mixer_l(a) (state updated in place)
                  a = LN2(H1); H0 = H1 + down(up_value(a) * gelu(up_gate(a)))
    out[:, t + 1] = decoder(LN_final(H0))

Scratch per program (fp32, rows of BB): H0, H1, A (BB, D each), G (BB, F) for the MLP and
M for the mixer's intermediates; the recurrent state sits in its own per-program
area, loaded from the prefill before the launch. A barrier separates every stage that
writes scratch from the next one that reads it (and, by the same token, every read from
the next overwrite).

The mixer is picked by the constexpr MIXER (0 LRU/S5, 1 S4D, 2 Mamba, 3 RG-LRU); its
parameters arrive as the generic pointers m0..m8 and sizes md0..md3 (documented in
`lrnn_lightning.rollout.fused.pack`), its block sizes as BM0..BM4 (`launch.kernel_blocks`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.common import gated_up, layer_norm, linear
from lrnn_lightning.rollout.fused.kernels.lti import modal_update, s4d_step
from lrnn_lightning.rollout.fused.kernels.ltv import mamba_step, rglru_step
from lrnn_lightning.rollout.fused.kernels.phased import phased_rollout_kernel  # noqa: F401 (launched from here)
from lrnn_lightning.rollout.fused.kernels.registers import register_rollout_kernel  # noqa: F401 (launched from here)


# batch, horizon and strides vary from call to call: specialising on them would recompile for every
# rollout length; the model's widths stay specialised (they decide how weight rows are vectorised)
@triton.jit(do_not_specialize=["out_stride_b", "out_stride_t", "dt_stride_b", "scratch_stride", "state_stride_prog",
                               "state_stride_layer", "B", "n_steps"])
def fused_rollout_kernel(
    out_ptr, out_stride_b, out_stride_t, dt_ptr, dt_stride_b,
    scratch_ptr, scratch_stride, state_ptr, state_stride_prog, state_stride_layer, state_stride_row,
    enc_w, enc_b, dec_w, dec_b, final_g, final_b,
    norm1_g, norm1_b, norm2_g, norm2_b, up_w, up_b, down_w, down_b,
    m0, m1, m2, m3, m4, m5, m6, m7, m8,
    B, n_steps, W, D, F, n_layers, md0, md1, md2, md3, eps,
    MIXER: tl.constexpr, RULE: tl.constexpr, EVENT: tl.constexpr, HAS_SCALE: tl.constexpr,
    BB: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr, BF: tl.constexpr,
    BM0: tl.constexpr, BM1: tl.constexpr, BM2: tl.constexpr, BM3: tl.constexpr, BM4: tl.constexpr,
    PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """Grid (cdiv(B, BB),). out (B, n_steps + 1, W) holds x0 in column 0 and receives step t's output
    in column t + 1; dt (B, n_steps) fp32 when EVENT; state (L, programs * BB, state width) fp32, updated
    in place; weights as packed by `pack_model` (stacked over layers)."""
    pid = tl.program_id(0)
    row0 = pid * BB
    rows = tl.arange(0, BB)
    row_ok = row0 + rows < B

    scratch = scratch_ptr + pid.to(tl.int64) * scratch_stride
    h0 = scratch
    h1 = h0 + BB * D
    a = h1 + BB * D
    g = a + BB * D
    m = g + BB * F
    state0 = state_ptr + pid.to(tl.int64) * state_stride_prog
    out = out_ptr + row0.to(tl.int64) * out_stride_b

    for t in range(n_steps):
        if EVENT:
            dt = tl.load(dt_ptr + (row0 + rows).to(tl.int64) * dt_stride_b + t, mask=row_ok, other=1.0)
        else:
            dt = tl.full((BB,), 1.0, tl.float32)
        linear(out + t * out_stride_t, out_stride_b, enc_w, enc_b, W, D, h0, D, row_ok,
               h0, D, h0, D, enc_b, True, False, False, 0, BB, BD, BK, PREC, W_BF16, EMULATE_BF16)
        tl.debug_barrier()
        state = state0
        for layer in range(n_layers):
            layer_norm(h0, a, D, norm1_g + layer * D, norm1_b + layer * D, D, eps, row_ok, BB, BD)
            tl.debug_barrier()
            if MIXER == 0:
                # LRU / S5: m0 B (2P, D), m1 readout (D, 2P), m2 D_skip (D,), m3/m4 coefficients (2, P), m5 Delta (P,)
                P = md0
                linear(a, D, m0 + layer * (2 * P * D), m0, D, 2 * P, m, 2 * P, row_ok,
                       m, 2 * P, m, 2 * P, m2, False, False, False, 0, BB, BM0, BK, PREC, W_BF16, EMULATE_BF16)
                tl.debug_barrier()
                modal_update(m, 2 * P, state, state_stride_row, P, dt, row_ok, m3 + layer * (2 * P),
                             m4 + layer * (2 * P), m5 + layer * P, RULE, EVENT, HAS_SCALE, BB, BM1)
                tl.debug_barrier()
                linear(state, state_stride_row, m1 + layer * (2 * P * D), m1, 2 * P, D, h1, D, row_ok,
                       h0, D, a, D, m2 + layer * D, False, True, True, 0, BB, BD, BK, PREC, W_BF16, EMULATE_BF16)
            elif MIXER == 1:
                # S4D: m0/m1 coefficients (2, D, N), m2 C (2, D, N), m3 D_skip (D,)
                N = md0
                s4d_step(a, D, h0, h1, D, state, state_stride_row, D, N, dt, row_ok,
                         m0 + layer * (2 * D * N), m1 + layer * (2 * D * N), m2 + layer * (2 * D * N),
                         m3 + layer * D, EVENT, BB, BM0, BM1)
            elif MIXER == 2:
                mamba_step(a, h0, h1, D, m, state, state_stride_row, dt, row_ok, layer,
                           m0, m1, m2, m3, m4, m5, m6, m7, m8, md0, md1, md2, md3,
                           EVENT, BB, BD, BK, BM0, BM1, BM2, BM3, BM4, PREC, W_BF16, EMULATE_BF16)
            else:
                rglru_step(a, h0, h1, D, m, state, state_stride_row, dt, row_ok, layer,
                           m0, m1, m2, m3, m4, m5, m6, m7, m8, md0, md1,
                           EVENT, BB, BD, BK, BM0, BM4, PREC, W_BF16, EMULATE_BF16)
            tl.debug_barrier()
            layer_norm(h1, a, D, norm2_g + layer * D, norm2_b + layer * D, D, eps, row_ok, BB, BD)
            tl.debug_barrier()
            gated_up(a, D, up_w + layer * (2 * F * D), up_b + layer * (2 * F), D, F, g, F, row_ok,
                     BB, BF, BK, PREC, W_BF16, EMULATE_BF16)
            tl.debug_barrier()
            linear(g, F, down_w + layer * (D * F), down_b + layer * D, F, D, h0, D, row_ok,
                   h1, D, h1, D, down_b, True, True, False, 0, BB, BD, BK, PREC, W_BF16, EMULATE_BF16)
            tl.debug_barrier()
            state += state_stride_layer  # a pointer step: (layer * stride) could overflow int32
        layer_norm(h0, a, D, final_g, final_b, D, eps, row_ok, BB, BD)
        tl.debug_barrier()
        linear(a, D, dec_w, dec_b, D, W, out + (t + 1) * out_stride_t, out_stride_b, row_ok,
               a, D, a, D, dec_b, True, False, False, 0, BB, BW, BK, PREC, W_BF16, EMULATE_BF16)
        tl.debug_barrier()


# Triton decides at definition time whether a kernel is compiled or interpreted (TRITON_INTERPRET=1)
INTERPRETED = not isinstance(fused_rollout_kernel, triton.runtime.jit.JITFunction)
