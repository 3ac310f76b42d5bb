"""Triton source of the step's fused small matmul and complex-mode update (imported on first use, see `step_ops`).

One kernel computes, for a tile of BM rows and BN output features,

    out = alpha * N(x) @ W^T [+ alpha2 * x2 @ W2^T] [+ b] [GEGLU] [+ res] [+ skip_scale * skip]

where N is an optional LayerNorm over x's K features (two passes for mean and variance, as
nn.LayerNorm) and GEGLU takes W's rows [0, N) as the value and [N, 2N) as the gate:
out = value * gelu(gate). Every product is an fp32 FMA dot (input_precision "ieee"): the
same arithmetic as a float32 cuBLAS matmul with TF32 off, in one launch instead of the
three or four (split-K, scaling, reduction, memset) cuBLAS takes for these small shapes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gelu(x):
    # the exact (erf) GELU of F.gelu
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _row_sum(x):
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def step_matmul_kernel(
    x_ptr, x_stride, w_ptr, x2_ptr, x2_stride, w2_ptr, b_ptr, ln_w_ptr, ln_b_ptr,
    res_ptr, res_stride, skip_ptr, skip_stride, skip_scale_ptr, out_ptr, out_stride,
    M, K, K2, N, eps, alpha, alpha2,
    HAS_NORM: tl.constexpr, HAS_X2: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_SKIP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Grid (cdiv(M, BM), cdiv(N, BN)). x (M, K), W (N or 2N, K), x2 (M, K2), W2 (N, K2), out/res/skip (M, N);
    rows at the given strides, unit column stride; weights contiguous."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride

    if HAS_NORM:
        total = tl.full((BM,), 0.0, tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            total += _row_sum(tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0))
        mean = total / K
        squares = tl.full((BM,), 0.0, tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            mask = row_ok[:, None] & (ks < K)[None, :]
            centred = tl.where(mask, tl.load(x_rows + ks[None, :], mask=mask, other=0.0) - mean[:, None], 0.0)
            squares += _row_sum(centred * centred)
        # .to(fp32) after each use of a float argument: torch.compile passes them as fp64 scalars
        rstd = 1.0 / tl.sqrt_rn((squares / K + eps).to(tl.float32))

    acc = tl.full((BM, BN), 0.0, tl.float32)
    gate = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_NORM:
            ln_w = tl.load(ln_w_ptr + ks, mask=k_ok, other=0.0)
            ln_b = tl.load(ln_b_ptr + ks, mask=k_ok, other=0.0)
            x = (x - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
            x = tl.where(row_ok[:, None] & k_ok[None, :], x, 0.0)
        w_mask = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        if GLU:
            w_gate = tl.load(w_ptr + (N + cols)[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
            gate += tl.dot(x, tl.trans(w_gate), input_precision="ieee")
    acc = (acc * alpha).to(tl.float32)
    if HAS_X2:
        acc2 = tl.full((BM, BN), 0.0, tl.float32)
        x2_rows = x2_ptr + rows.to(tl.int64)[:, None] * x2_stride
        for k0 in range(0, K2, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K2
            x2 = tl.load(x2_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w2 = tl.load(w2_ptr + cols[:, None] * K2 + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc2 += tl.dot(x2, tl.trans(w2), input_precision="ieee")
        acc += (alpha2 * acc2).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if GLU:
            gate += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0)[None, :]
    if GLU:
        acc = acc * _gelu(gate)
    mask = row_ok[:, None] & col_ok[None, :]
    row_offsets = rows.to(tl.int64)[:, None]
    if HAS_RES:
        acc += tl.load(res_ptr + row_offsets * res_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_SKIP:
        scale = tl.load(skip_scale_ptr + cols, mask=col_ok, other=0.0)
        acc += scale[None, :] * tl.load(skip_ptr + row_offsets * skip_stride + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + row_offsets * out_stride + cols[None, :], acc, mask=mask)


@triton.jit
def modal_update_kernel(h_re_ptr, h_im_ptr, u_re_ptr, u_im_ptr, u_stride, decay_ptr, decay_stride,
                        scale_ptr, scale_stride, M, P, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """h <- decay * h + scale * u in place, elementwise over complex modes held as real pairs.

    h_re, h_im (M, P) contiguous; u_re, u_im (M, P) at row stride u_stride; decay and scale complex
    (M or 1, P) as interleaved (re, im) pairs at row stride decay_stride / scale_stride (0: shared by rows).
    """
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < M * P
    row = (offsets // P).to(tl.int64)
    col = offsets % P
    h_re = tl.load(h_re_ptr + offsets, mask=ok, other=0.0)
    h_im = tl.load(h_im_ptr + offsets, mask=ok, other=0.0)
    u_re = tl.load(u_re_ptr + row * u_stride + col, mask=ok, other=0.0)
    u_im = tl.load(u_im_ptr + row * u_stride + col, mask=ok, other=0.0)
    if HAS_SCALE:
        s_re = tl.load(scale_ptr + row * scale_stride + 2 * col, mask=ok, other=0.0)
        s_im = tl.load(scale_ptr + row * scale_stride + 2 * col + 1, mask=ok, other=0.0)
        u_re, u_im = u_re * s_re - u_im * s_im, u_im * s_re + u_re * s_im
    d_re = tl.load(decay_ptr + row * decay_stride + 2 * col, mask=ok, other=0.0)
    d_im = tl.load(decay_ptr + row * decay_stride + 2 * col + 1, mask=ok, other=0.0)
    tl.store(h_re_ptr + offsets, u_re + d_re * h_re - d_im * h_im, mask=ok)
    tl.store(h_im_ptr + offsets, u_im + d_re * h_im + d_im * h_re, mask=ok)


# Triton decides at definition time whether a kernel is compiled or interpreted (TRITON_INTERPRET=1)
INTERPRETED = not isinstance(step_matmul_kernel, triton.runtime.jit.JITFunction)
