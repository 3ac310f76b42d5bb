"""The per-block math of the register-resident kernels (registers.py, resident.py), on tensors in registers.

Each helper takes one program's tile of BB rows: LayerNorm, one block of BP complex modes
of an LRU / S5 mixer, and one block of BF hidden units of the gated MLP. Weight tiles are
row-major (N, K) as packed (`pack.py`); `common.product` multiplies.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.common import gelu, load_tile, row_sum, tile_product
from lrnn_lightning.rollout.fused.kernels.lti import advance_modes


@triton.jit
def normalize(h, g_ptr, b_ptr, D, eps, BD: tl.constexpr):
    """LayerNorm over the D valid columns of h (BB, BD); the padded columns come out zero."""
    ds = tl.arange(0, BD)
    g = tl.load(g_ptr + ds, mask=ds < D, other=0.0)
    b = tl.load(b_ptr + ds, mask=ds < D, other=0.0)
    return normalize_with(h, g, b, D, eps, BD)


@triton.jit
def normalize_with(h, g, b, D, eps, BD: tl.constexpr):
    """LayerNorm of h (BB, BD) with the gain g and bias b (BD,) already loaded (zero beyond D)."""
    d_ok = (tl.arange(0, BD) < D)[None, :]
    mean = row_sum(tl.where(d_ok, h, 0.0), axis=1) / D
    centred = tl.where(d_ok, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(row_sum(centred * centred, axis=1) / D + eps)
    return centred * rstd[:, None] * g[None, :] + b[None, :]


@triton.jit
def mode_tiles(win, readout, D, P, p0, BD: tl.constexpr, BP: tl.constexpr, CH: tl.constexpr):
    """B's rows [Re; Im] (BP, BD) of the modes [p0, p0 + BP) and the readout's columns of them (BD, BP), zero
    beyond P and D, as `common.load_tile` lays them out: flat, or chunked when CH > 0 ((BD / CH, BP, CH) and
    (BP / CH, BD, CH), CH capped at the tile's width).

    win (2P, D) is B as [Re; Im] rows; readout (D, 2P) the real map [C_re, -C_im].
    """
    ds = tl.arange(0, BD)
    ps = p0 + tl.arange(0, BP)
    p_ok = ps < P
    b_re = load_tile(win, D, ps, p_ok, D, BD, CH)
    b_im = load_tile(win + P * D, D, ps, p_ok, D, BD, CH)
    c_re = load_tile(readout + p0, 2 * P, ds, ds < D, P - p0, BP, CH)
    c_im = load_tile(readout + P + p0, 2 * P, ds, ds < D, P - p0, BP, CH)
    return b_re, b_im, c_re, c_im


@triton.jit
def modal_block(a, b_re, b_im, c_re, c_im, s_re, s_im, decay_re, decay_im, scale_re, scale_im,
                HAS_SCALE: tl.constexpr, BB: tl.constexpr, CH: tl.constexpr, PREC: tl.constexpr,
                W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """One block of BP modes: s' = decay s + scale B a, and its share C s' of the output.

    a (BB, BD); b_re, b_im (BP, BD) and c_re, c_im (BD, BP) flat, or chunked from `mode_tiles(.., CH)` (then
    BB is 1); s_re, s_im (BB, BP); the coefficients (1, BP) or (BB, BP). Returns (C s' (BB, BD), s'_re, s'_im).
    """
    u_re = tile_product(a, b_re, BB, CH, PREC, W_BF16, EMULATE_BF16)
    u_im = tile_product(a, b_im, BB, CH, PREC, W_BF16, EMULATE_BF16)
    new_re, new_im = advance_modes(u_re, u_im, s_re, s_im, decay_re, decay_im, scale_re, scale_im, HAS_SCALE)
    y = (tile_product(new_re, c_re, BB, CH, PREC, W_BF16, EMULATE_BF16)
         + tile_product(new_im, c_im, BB, CH, PREC, W_BF16, EMULATE_BF16))
    return y, new_re, new_im


@triton.jit
def mlp_tiles(up_w, up_b, down_w, D, F, f0, BD: tl.constexpr, BF: tl.constexpr, CH: tl.constexpr):
    """Hidden units [f0, f0 + BF) of the gated MLP: Wv (BF, BD), Wg (BF, BD), Wdown (BD, BF) as `common.load_tile`
    lays them out (flat, or chunked when CH > 0: (BD / CH, BF, CH) and (BF / CH, BD, CH), CH capped at the
    tile's width), and bv and bg (1, BF).

    Beyond F everything is masked to zero (and no memory is read), so the block after the
    last can be "prefetched" harmlessly.
    """
    ds = tl.arange(0, BD)
    d_ok = ds < D
    fs = f0 + tl.arange(0, BF)
    f_ok = fs < F
    w_value = load_tile(up_w, D, fs, f_ok, D, BD, CH)
    w_gate = load_tile(up_w + F * D, D, fs, f_ok, D, BD, CH)
    w_down = load_tile(down_w + f0, F, ds, d_ok, F - f0, BF, CH)
    b_value = tl.load(up_b + fs, mask=f_ok, other=0.0)[None, :]
    b_gate = tl.load(up_b + F + fs, mask=f_ok, other=0.0)[None, :]
    return w_value, w_gate, w_down, b_value, b_gate


@triton.jit
def mlp_block(a, w_value, w_gate, w_down, b_value, b_gate, BB: tl.constexpr, CH: tl.constexpr, PREC: tl.constexpr,
              W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """One block of BF hidden units' share Wdown_f ((Wv_f a + bv_f) * gelu(Wg_f a + bg_f)) (BB, BD) of the MLP
    (tiles of `mlp_tiles(.., CH)`)."""
    value = tile_product(a, w_value, BB, CH, PREC, W_BF16, EMULATE_BF16) + b_value
    gate = tile_product(a, w_gate, BB, CH, PREC, W_BF16, EMULATE_BF16) + b_gate
    return tile_product(value * gelu(gate), w_down, BB, CH, PREC, W_BF16, EMULATE_BF16)  # padded units: 0 * gelu(0)
