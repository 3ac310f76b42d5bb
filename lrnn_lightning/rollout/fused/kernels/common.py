"""Triton building blocks of the fused rollout: tiled linear maps, LayerNorm and scalar math.

Every helper works on one program's tile of BB batch rows. `product` (and the scalar math)
serve both kernels; the memory-to-memory helpers (`linear`, `gated_up`, `layer_norm`) serve
the scratch kernel (rollout.py), where activations travel between stages through a
per-program fp32 scratch area (rows of a fixed stride, L1/L2-resident), so a stage can loop
over blocks of any width; the caller puts a `tl.debug_barrier()` between a stage that writes
scratch and the next one that reads it. `row_ok` (BB,) masks
the rows beyond the batch: they are neither loaded (zeros instead) nor stored.

Weight matrices are row-major (N, K), as in `nn.Linear`, in fp32 or bf16; everything
else is fp32. A tile of BB >= 16 rows multiplies with tl.dot: `PREC` is its input_precision
for fp32 weights ("ieee", "tf32x3", "tf32"), and bf16 weights meet bf16-rounded activations
on the tensor cores (`EMULATE_BF16` computes that as an fp32 dot of the rounded operands:
the same numbers, for the Triton interpreter, whose dot does not take bf16). A small tile
(BB = 1, 2, 4 or 8 rows: tl.dot needs 16) multiplies on the FMA units instead, as a
broadcast product summed over K (`small_product`): exact fp32 whatever PREC says, and bf16
weights are widened to fp32 there, so the activations are not rounded. One row can also multiply a tile
loaded in chunks (`load_tile`, `chunked_product`), which sums more of each row inside a thread.

Nothing here calls Triton's standard library of jit functions (tl.sum, tl.zeros,
tl.sigmoid): those are defined when Triton is imported, so a process that imported Triton
compiled could not run them in the interpreter; `row_sum`, `sigmoid` and tl.full stand in.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot_block(x, w, PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x (M, K) fp32 (or bf16, with bf16 weights) times w (K, N) in the weights' dtype -> (M, N) fp32."""
    if W_BF16:
        if EMULATE_BF16:
            return tl.dot(x.to(tl.bfloat16).to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(x.to(tl.bfloat16), w)
    else:
        return tl.dot(x, w, input_precision=PREC)


@triton.jit
def small_product(x, w, BB: tl.constexpr):
    """x (BB, K) fp32 times the weight tile w (N, K) (fp32 or bf16, row-major as stored) -> (BB, N) fp32.

    The (BB, N, K) broadcast product summed over K, without tl.dot: for tiles of fewer than 16
    rows, where one program per few batch rows keeps every SM busy at small batch sizes. One
    row multiplies in the weight tile's own (N, K) layout: only the K-vector x moves between
    threads, where a 3-D product would send the whole tile through shared memory. Two and four
    rows are split apart and each multiplies so (the tile is loaded once; sm_90 code for a
    2-row (256, 128, 64, 4) LRU step: 2432 instructions against 4976 as a 3-D product); eight
    rows take the 3-D product.
    """
    if BB == 1:
        return row_sum(w.to(tl.float32) * x, axis=1)[None, :]
    elif BB == 2:
        w = w.to(tl.float32)
        x0, x1 = tl.split(tl.trans(x))
        return tl.trans(tl.join(row_sum(w * x0[None, :], axis=1), row_sum(w * x1[None, :], axis=1)))
    elif BB == 4:
        w = w.to(tl.float32)
        even, odd = tl.split(tl.reshape(tl.trans(x), (x.shape[1], 2, 2)))  # (K, 2): rows 0, 2 and rows 1, 3
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        y02 = tl.join(row_sum(w * x0[None, :], axis=1), row_sum(w * x2[None, :], axis=1))
        y13 = tl.join(row_sum(w * x1[None, :], axis=1), row_sum(w * x3[None, :], axis=1))
        return tl.trans(tl.reshape(tl.join(y02, y13), (w.shape[0], 4)))  # [n, i, j] = row 2i + j
    else:
        return row_sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def product(x, w, BB: tl.constexpr, PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x (BB, K) fp32 times the weight tile w (N, K) -> (BB, N) fp32: tl.dot for BB >= 16, else `small_product`."""
    if BB < 16:
        return small_product(x, w, BB)
    else:
        return dot_block(x, tl.trans(w), PREC, W_BF16, EMULATE_BF16)


@triton.jit
def load_tile(ptr, row_stride, rows, row_ok, K, BK: tl.constexpr, CH: tl.constexpr):
    """The weight tile of `rows` (N,) and columns [0, BK) at ptr (row-major, row_stride apart), zero where
    ~row_ok or at columns >= K: flat (N, BK) when CH is 0, else chunked for `chunked_product`: (BK // CH, N, CH)
    with element [c, n, j] holding column c * CH + j of row n, or (1, N, BK) when CH >= BK. CH: 0 or a power
    of two."""
    tl.static_assert(CH == 0 or (CH & (CH - 1)) == 0, "load_tile: the chunk width CH must be 0 or a power of two")
    if CH == 0:
        ks = tl.arange(0, BK)
        return tl.load(ptr + rows[:, None] * row_stride + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :],
                       other=0.0)
    else:
        WIDTH: tl.constexpr = CH if CH < BK else BK  # a chunk, capped at the tile's width
        ks = tl.arange(0, BK // WIDTH)[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
        return tl.load(ptr + rows[None, :, None] * row_stride + ks[:, None, :],
                       mask=row_ok[None, :, None] & (ks < K)[:, None, :], other=0.0)


@triton.jit
def chunked_product(x, w):
    """x (1, K) fp32 times the chunked weight tile w (K // CH, N, CH) or (1, N, K) (`load_tile`) -> (1, N) fp32.

    Triton spreads a tile's contiguous dimension over the threads of a warp, four values a thread:
    a flat (N, 128) tile is summed over K by 4 multiply-adds and 5 rounds of shuffles a row. In
    the chunked tile the chunks lie along the slowest dimension, which each thread holds whole,
    so a row sums K // CH * 4 products in the thread and CH / 4 threads by shuffles.
    """
    xs = tl.reshape(x, (w.shape[0], w.shape[2]))
    return row_sum(row_sum(w.to(tl.float32) * xs[:, None, :], axis=2), axis=0)[None, :]


@triton.jit
def tile_product(x, w, BB: tl.constexpr, CH: tl.constexpr, PREC: tl.constexpr, W_BF16: tl.constexpr,
                 EMULATE_BF16: tl.constexpr):
    """`product` of x (BB, K) and a tile from `load_tile(.., CH)`: chunked (one row, CH > 0) or flat."""
    if CH == 0:
        return product(x, w, BB, PREC, W_BF16, EMULATE_BF16)
    else:
        tl.static_assert(BB == 1, "chunked tiles multiply one row")
        return chunked_product(x, w)


@triton.jit
def linear(x_ptr, x_stride, w_ptr, b_ptr, K, N, out_ptr, out_stride, row_ok,
           res_ptr, res_stride, skip_ptr, skip_stride, skip_scale_ptr,
           HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_SKIP: tl.constexpr, ACT: tl.constexpr,
           BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
           PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """out = act(x @ W^T + b) + res + skip_scale * skip, blocked over N and K.

    Shapes: x (BB, K), W (N, K), b (N,), res and skip (BB, N), skip_scale (N,), out (BB, N),
    each with its own row stride and unit column stride. ACT: 0 none, 1 softplus, 2 sigmoid
    (applied before res and skip).
    """
    rows = tl.arange(0, BB)
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        n_ok = ns < N
        acc = tl.full((BB, BN), 0.0, tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            x = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + ns[:, None] * K + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += product(x, w, BB, PREC, W_BF16, EMULATE_BF16)
        if HAS_BIAS:
            acc += tl.load(b_ptr + ns, mask=n_ok, other=0.0)[None, :]
        if ACT == 1:
            acc = softplus(acc)
        if ACT == 2:
            acc = sigmoid(acc)
        mask = row_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + rows[:, None] * res_stride + ns[None, :], mask=mask, other=0.0)
        if HAS_SKIP:
            scale = tl.load(skip_scale_ptr + ns, mask=n_ok, other=0.0)
            acc += scale[None, :] * tl.load(skip_ptr + rows[:, None] * skip_stride + ns[None, :], mask=mask,
                                            other=0.0)
        tl.store(out_ptr + rows[:, None] * out_stride + ns[None, :], acc, mask=mask)


@triton.jit
def gated_up(x_ptr, x_stride, w_ptr, b_ptr, K, F, out_ptr, out_stride, row_ok,
             BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """The GeGLU up-projection: out = (x @ Wv^T + bv) * gelu(x @ Wg^T + bg).

    W (2F, K) holds Wv in rows [0, F) and Wg in rows [F, 2F), b (2F,) likewise; out (BB, F).
    """
    rows = tl.arange(0, BB)
    for n0 in range(0, F, BN):
        ns = n0 + tl.arange(0, BN)
        n_ok = ns < F
        value = tl.full((BB, BN), 0.0, tl.float32)
        gate = tl.full((BB, BN), 0.0, tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            x = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w_mask = n_ok[:, None] & k_ok[None, :]
            w_value = tl.load(w_ptr + ns[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
            w_gate = tl.load(w_ptr + (F + ns)[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
            value += product(x, w_value, BB, PREC, W_BF16, EMULATE_BF16)
            gate += product(x, w_gate, BB, PREC, W_BF16, EMULATE_BF16)
        value += tl.load(b_ptr + ns, mask=n_ok, other=0.0)[None, :]
        gate += tl.load(b_ptr + F + ns, mask=n_ok, other=0.0)[None, :]
        out = value * gelu(gate)
        tl.store(out_ptr + rows[:, None] * out_stride + ns[None, :], out, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def layer_norm(x_ptr, out_ptr, stride, g_ptr, b_ptr, D, eps, row_ok, BB: tl.constexpr, BD: tl.constexpr):
    """out = (x - mean) / sqrt(var + eps) * g + b over the D features of each row; x, out (BB, D).

    Three passes (mean, variance of the centred rows, normalise) as in nn.LayerNorm: a
    one-pass E[x^2] - mean^2 would cancel for rows with a large mean.
    """
    rows = tl.arange(0, BB)
    total = tl.full((BB,), 0.0, tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        x = tl.load(x_ptr + rows[:, None] * stride + ds[None, :], mask=row_ok[:, None] & (ds < D)[None, :], other=0.0)
        total += row_sum(x, axis=1)
    mean = total / D
    sq = tl.full((BB,), 0.0, tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        mask = row_ok[:, None] & (ds < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride + ds[None, :], mask=mask, other=0.0)
        centred = tl.where(mask, x - mean[:, None], 0.0)
        sq += row_sum(centred * centred, axis=1)
    rstd = 1.0 / tl.sqrt_rn(sq / D + eps)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_ok = ds < D
        mask = row_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride + ds[None, :], mask=mask, other=0.0)
        g = tl.load(g_ptr + ds, mask=d_ok, other=0.0)
        b = tl.load(b_ptr + ds, mask=d_ok, other=0.0)
        y = (x - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
        tl.store(out_ptr + rows[:, None] * stride + ds[None, :], y, mask=mask)


@triton.jit
def row_sum(x, axis: tl.constexpr):
    """Sum over `axis`: tl.sum's own reduction, which the interpreter also runs as one NumPy sum."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def gelu(x):
    """The exact (erf) GELU of F.gelu."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def silu(x):
    return x * sigmoid(x)


@triton.jit
def softplus(x):
    """F.softplus with beta=1, threshold=20: log(1 + e^x), and x itself above 20."""
    return tl.where(x > 20.0, x, log1p(tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def log1p(x):
    """log(1 + x) accurate for small x (Goldberg's trick: log(u) * x / (u - 1) with u = 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def expm1(x):
    """e^x - 1 accurate for small |x|: a Taylor polynomial on |x| < 0.5, e^x - 1 (no cancellation) outside."""
    # x^11 / 11! < 2^-39 on |x| < 0.5: far below fp32 rounding
    poly = 1.0 / 39916800.0
    poly = poly * x + 1.0 / 3628800.0
    poly = poly * x + 1.0 / 362880.0
    poly = poly * x + 1.0 / 40320.0
    poly = poly * x + 1.0 / 5040.0
    poly = poly * x + 1.0 / 720.0
    poly = poly * x + 1.0 / 120.0
    poly = poly * x + 1.0 / 24.0
    poly = poly * x + 1.0 / 6.0
    poly = poly * x + 0.5
    poly = (poly * x + 1.0) * x
    return tl.where(tl.abs(x) < 0.5, poly, tl.exp(x) - 1.0)


@triton.jit
def complex_div(a_re, a_im, b_re, b_im):
    """(a_re + i a_im) / (b_re + i b_im)."""
    denom = b_re * b_re + b_im * b_im
    return (a_re * b_re + a_im * b_im) / denom, (a_im * b_re - a_re * b_im) / denom


@triton.jit
def complex_exp(z_re, z_im):
    """exp(z) as (re, im)."""
    magnitude = tl.exp(z_re)
    return magnitude * tl.cos(z_im), magnitude * tl.sin(z_im)


@triton.jit
def complex_expm1(z_re, z_im):
    """exp(z) - 1 without cancellation for small |z|: Re = expm1(x) cos y - 2 sin^2(y / 2)."""
    half_sin = tl.sin(0.5 * z_im)
    re = expm1(z_re) * tl.cos(z_im) - 2.0 * half_sin * half_sin
    return re, tl.exp(z_re) * tl.sin(z_im)
