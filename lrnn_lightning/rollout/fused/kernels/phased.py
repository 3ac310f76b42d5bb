"""The phased fused rollout of LRU / S5 models at large batch: every step's matmuls spread over the whole GPU.

The register kernel (registers.py) gives each program a tile of rows for the whole rollout,
so every program streams every weight at every step: at (1024, 512, 128, 8) its 64 tiles
read 64 copies of the model a step, and the kernel ran 3-11x slower than the CUDA graph
(RESULTS.md). Here a persistent grid of NPROG programs (one an SM, launched cooperatively)
runs each step as a chain of phases, each a matmul cut into (rows, columns) tiles that the
programs share out; each tile reads only the rows and weight columns it needs, so a weight
is read once per row tile, not once per row:

    per step t:  DE  (row tiles)           decode step t - 1's output  x = dec(LN_f(h)) -> out[:, t];
                                           encode h = enc(x)
                 per layer:
                   M  (rows x modes)       u = B LN1(h);  s = decay s + scale u           (state in memory)
                   Y  (rows x d_model)     h = h + (C s + D_skip LN1(h))
                   U  (rows x hidden)      g = (Wv LN2(h) + bv) * gelu(Wg LN2(h) + bg)
                   Dn (rows x d_model)     h = h + (Wdown g + b_down)
    after the last step: DE decodes only.

The residual stream h (rows, D) and the MLP's hidden units g (rows, F) live in memory
(L2-resident). A LayerNorm needs whole rows, which no column tile holds: the phase that
writes a tile of h also writes each row's mean and sum of squared deviations over the
tile's columns (`tile_stats`), and the next phase merges these partials per row
(`merged_stats`, Chan et al.'s pairwise update): no phase takes a pass over h for them.
The partials alternate between two buffers (phases Y write the second, DE and Dn the first)
so that no phase overwrites partials another program may still read.

Every tile multiplies with tl.dot (BM >= 16 rows), as the register kernel's tl.dot tiles do:
bf16 weights meet bf16-rounded activations on the tensor cores, fp32 weights take PREC. On bf16
weights packed with the folded copies (FOLD) a product after a LayerNorm multiplies a bf16 copy of
h, less a centre for each row, by weights with the norm's gain folded in, and normalises after the
product (fold.py): both operands go from shared memory straight to the tensor cores (320 -> 279 µs a
step at (1024, 512, 128, 8) on an H100; with the phases' own tiles 249, and 257 with the centres,
which keep its rounding as small as the normalised product's; RESULTS.md, thirteenth session).
Every tile reads and writes only data of its own rows (h, its partials and copies, g, the state, the output), so a
tile waits only for the tiles of the phase before it on the same rows, not for the whole grid: each row block (the
BM rows of a tile of phases Y, U and Dn; phases M and DE cut it into row tiles as large or smaller) has a counter of
finished tiles, which every tile bumps when done (`rows_done`, a release) and the next phase's tiles on those rows
poll until it reaches the count of every tile before their phase since the launch (`wait_for_rows`, an acquire).
Counting a block's tiles in phase order is enough: a tile starts only after every earlier phase finished on its
rows, so the count passes a phase's threshold only when that phase, and everything that read what the next
overwrites, has finished there. A program takes its tiles in phase order and each waits only for earlier phases, so
the grid cannot deadlock once every program is resident (the cooperative launch). With NPROG 1 (the Triton
interpreter, which runs one program at a time) there is nothing to wait for, and one program does every tile (and
still counts them). The counters replaced barriers over the whole grid between phases: 249-257 -> 235-246 µs a
step at (1024, 512, 128, 8) with bf16 weights (RESULTS.md, fifteenth session).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.common import dot_block, gelu, row_sum
from lrnn_lightning.rollout.fused.kernels.lti import advance_modes, mode_coefficients


@triton.jit
def wait_for_rows(done, block, target, NPROG: tl.constexpr):
    """Wait until row block `block`'s counter in `done` ((ROWS / BM,) int32) reaches `target`: every task before the
    caller's phase on these rows has finished, and what it stored is visible (nothing to wait for when NPROG is 1,
    where one program runs every task in order)."""
    if NPROG > 1:
        # every poll is an acquire, as in group.group_barrier; the difference keeps the test right after wrap-around
        now = tl.atomic_add(done + block, 0, sem="acquire", scope="gpu")
        while now - target < 0:
            now = tl.atomic_add(done + block, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()  # what thread 0 acquired, the whole program sees


@triton.jit
def rows_done(done, block):
    """Count one finished task on row block `block`: its stores, and its loads, happen before the count. (One
    program counts too, although nothing waits: the final counts show that every tile ran once.)"""
    tl.debug_barrier()  # every thread's accesses of the task come before the release below
    tl.atomic_add(done + block, 1, sem="release", scope="gpu")


@triton.jit
def tile_stats(stats, rows, c, v, cs, D: tl.constexpr, BNC: tl.constexpr, ROWS: tl.constexpr):
    """Store the (mean, sum of squared deviations) over the valid columns cs of v (BM, BNC) for each row, as
    column tile c's partial in `stats` ((D / BNC, ROWS, 2) fp32); returns the means (BM,)."""
    c_ok = (cs < D)[None, :]
    n_c = tl.minimum(D - c * BNC, BNC).to(tl.float32)
    mean = row_sum(tl.where(c_ok, v, 0.0), axis=1) / n_c
    centred = tl.where(c_ok, v - mean[:, None], 0.0)
    cell = stats + (c * ROWS + rows) * 2
    tl.store(cell, mean)
    tl.store(cell + 1, row_sum(centred * centred, axis=1))
    return mean


@triton.jit
def tile_width(c: tl.constexpr, D: tl.constexpr, BNC: tl.constexpr):
    """Valid columns of column tile c (a constexpr) of d_model D."""
    return (D - c * BNC) if D - c * BNC < BNC else BNC


@triton.jit
def merged_stats(stats, rows, eps, D: tl.constexpr, BNC: tl.constexpr, ROWS: tl.constexpr):
    """Each row's LayerNorm (mean, 1 / std) from the column tiles' partials in `stats` (`tile_stats`)."""
    NC: tl.constexpr = (D + BNC - 1) // BNC
    total = tl.load(stats + rows * 2) * tile_width(0, D, BNC)
    for c in tl.static_range(1, NC):
        total += tl.load(stats + (c * ROWS + rows) * 2) * tile_width(c, D, BNC)
    mean = total / D
    sq = tl.full(mean.shape, 0.0, tl.float32)
    for c in tl.static_range(0, NC):
        cell = stats + (c * ROWS + rows) * 2
        shift = tl.load(cell) - mean
        sq += tl.load(cell + 1) + shift * shift * tile_width(c, D, BNC)
    return mean, 1.0 / tl.sqrt_rn(sq / D + eps)


@triton.jit
def normalized_chunk(h, rows, ks, mean, rstd, g_ptr, b_ptr, D: tl.constexpr):
    """LN(h)[rows, ks] (BM, BK) from the row statistics; zero at columns >= D."""
    k_ok = ks < D
    x = tl.load(h + rows[:, None] * D + ks[None, :], mask=k_ok[None, :], other=0.0)
    g = tl.load(g_ptr + ks, mask=k_ok, other=0.0)
    b = tl.load(b_ptr + ks, mask=k_ok, other=0.0)
    return tl.where(k_ok[None, :], (x - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :], 0.0)


@triton.jit
def normalized_products(h, rows, mean, rstd, g_ptr, b_ptr, w_ptr, w2_ptr, ns, n_ok, D: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TWO: tl.constexpr, STAGES: tl.constexpr,
                        PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """LN(h)[rows] (BM, D) times the rows ns (BN,) of the weight matrix at w_ptr ((N, D), row-major) -> (BM, BN),
    and (TWO) times those of the matrix at w2_ptr too, from the same normalised chunks (else the second result
    is zeros)."""
    acc = tl.full((BM, BN), 0.0, tl.float32)
    acc2 = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in tl.range(0, D, BK, num_stages=STAGES):
        ks = k0 + tl.arange(0, BK)
        a = normalized_chunk(h, rows, ks, mean, rstd, g_ptr, b_ptr, D)
        cells = ns[None, :] * D + ks[:, None]
        w_mask = n_ok[None, :] & (ks < D)[:, None]
        acc += dot_block(a, tl.load(w_ptr + cells, mask=w_mask, other=0.0), PREC, W_BF16, EMULATE_BF16)
        if TWO:
            acc2 += dot_block(a, tl.load(w2_ptr + cells, mask=w_mask, other=0.0), PREC, W_BF16, EMULATE_BF16)
    return acc, acc2


@triton.jit
def centred_copy(h16, rows, cs, c_ok, v, ref, D: tl.constexpr):
    """h16[rows, cs] = v - ref (each row's centre, (BM,)), in bf16: the copy that `folded_products` multiplies."""
    tl.store(h16 + rows[:, None] * D + cs[None, :], (v - ref[:, None]).to(tl.bfloat16), mask=c_ok[None, :])


@triton.jit
def folded_products(h16, centre, rows, mean, rstd, w_ptr, w2_ptr, sums, sums2, shifts, shifts2, ns, n_ok,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TWO: tl.constexpr,
                    STAGES: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """`normalized_products` on bf16 weights whose LayerNorm gain is folded in (fold.py) -> (BM, BN), and with TWO
    the same of w2', sums2 and shifts2 (else zeros).

    h16 (ROWS, D) holds h less a centre c_r for each row (centre (ROWS,), `centred_copy`), a recent mean of the row
    (fold.py), so that its bf16 rounding errs about as little as LN(h)'s would. Then
    LN(h) w^T = rstd (h16 w'^T - (mean - c_r) sums) + shifts, with sums the row sums of w' (N, D) and shifts = w b,
    for the weight rows ns."""
    s = tl.load(sums + ns, mask=n_ok, other=0.0)[None, :]
    shift = tl.load(shifts + ns, mask=n_ok, other=0.0)[None, :]
    if TWO:
        s2 = tl.load(sums2 + ns, mask=n_ok, other=0.0)[None, :]
        shift2 = tl.load(shifts2 + ns, mask=n_ok, other=0.0)[None, :]
    offset = (mean - tl.load(centre + rows))[:, None]
    acc = tl.full((BM, BN), 0.0, tl.float32)
    acc2 = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in tl.range(0, D, BK, num_stages=STAGES):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < D
        x = tl.load(h16 + rows[:, None] * D + ks[None, :], mask=k_ok[None, :], other=0.0)
        cells = ns[None, :] * D + ks[:, None]
        w_mask = n_ok[None, :] & k_ok[:, None]
        acc += dot_block(x, tl.load(w_ptr + cells, mask=w_mask, other=0.0), "ieee", True, EMULATE_BF16)
        if TWO:
            acc2 += dot_block(x, tl.load(w2_ptr + cells, mask=w_mask, other=0.0), "ieee", True, EMULATE_BF16)
    acc = rstd[:, None] * (acc - offset * s) + shift
    if TWO:
        acc2 = rstd[:, None] * (acc2 - offset * s2) + shift2
    return acc, acc2


@triton.jit
def plain_product(x_ptr, rows, w_ptr, ns, n_ok, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr, W_BF16: tl.constexpr,
                  EMULATE_BF16: tl.constexpr):
    """x[rows] (BM, K) from memory (rows K apart; fp32, or bf16 with bf16 weights) times the rows
    ns (BN,) of the weight matrix at w_ptr ((N, K), row-major) -> (BM, BN)."""
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ns[None, :] * K + ks[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += dot_block(x, w, PREC, W_BF16, EMULATE_BF16)  # a bf16 x's cast to bf16 is a no-op
    return acc


@triton.jit
def decode_encode(t, n_steps, out_ptr, out_stride_b, out_stride_t, B, h, h16, centre, stats, eps, enc_w, enc_b,
                  dec_w, dec_b, final_g, final_b, dec_wf, dec_sums, dec_bf, done, target, pid, W: tl.constexpr,
                  D: tl.constexpr, ROWS: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr,
                  BNC: tl.constexpr, BK: tl.constexpr, NPROG: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr,
                  W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr, FOLD: tl.constexpr):
    """Phase DE of step t: for each of this program's row tiles, decode x = dec(LN_f(h)) into out[:, t] (t > 0;
    x0 = out[:, 0] at t = 0), then encode h = enc(x) (t < n_steps) with its LN partials (and where FOLD h's bf16
    copy, centred on each row's mean over the first column tile). Each tile first waits for its row block's
    counter to reach `target` (`wait_for_rows`; blocks of BR rows)."""
    ws = tl.arange(0, BW)
    w_ok = ws < W
    for r in range(pid, ROWS // BM, NPROG):
        rows = r * BM + tl.arange(0, BM)
        block = r * BM // BR
        wait_for_rows(done, block, target, NPROG)
        io_mask = (rows < B)[:, None] & w_ok[None, :]
        out_rows = out_ptr + rows.to(tl.int64)[:, None] * out_stride_b + ws[None, :]
        if t > 0:
            mean, rstd = merged_stats(stats, rows, eps, D, BNC, ROWS)
            if FOLD:
                x, _ = folded_products(h16, centre, rows, mean, rstd, dec_wf, dec_wf, dec_sums, dec_sums, dec_bf,
                                       dec_bf, ws, w_ok, D, BM, BW, BK, False, STAGES, EMULATE_BF16)
            else:
                x, _ = normalized_products(h, rows, mean, rstd, final_g, final_b, dec_w, dec_w, ws, w_ok, D, BM, BW,
                                           BK, False, STAGES, PREC, W_BF16, EMULATE_BF16)
                x += tl.load(dec_b + ws, mask=w_ok, other=0.0)[None, :]
            tl.store(out_rows + t * out_stride_t, x, mask=io_mask)
            tl.debug_barrier()  # every thread has read the partials (and centres) that the encoding below overwrites
        else:
            x = tl.load(out_rows, mask=io_mask, other=0.0)
        if t < n_steps:
            ref = tl.full((BM,), 0.0, tl.float32)
            for c in range(0, (D + BNC - 1) // BNC):
                cs = c * BNC + tl.arange(0, BNC)
                c_ok = cs < D
                enc = tl.load(enc_w + cs[None, :] * W + ws[:, None], mask=c_ok[None, :] & w_ok[:, None], other=0.0)
                v = dot_block(x, enc, PREC, W_BF16, EMULATE_BF16) + tl.load(enc_b + cs, mask=c_ok, other=0.0)[None, :]
                tl.store(h + rows[:, None] * D + cs[None, :], v, mask=c_ok[None, :])
                tile_mean = tile_stats(stats, rows, c, v, cs, D, BNC, ROWS)
                if FOLD:
                    ref = tl.where(c == 0, tile_mean, ref)
                    centred_copy(h16, rows, cs, c_ok, v, ref, D)
            if FOLD:
                tl.store(centre + rows, ref)
        rows_done(done, block)


@triton.jit
def mix_modes(t, dt_ptr, dt_stride_b, B, h, h16, centre, stats, eps, state, s16, norm_g, norm_b, win, win_f, win_sums,
              win_shifts, coef_a, coef_b, steps_ptr, done, target, pid, D: tl.constexpr, P: tl.constexpr,
              ROWS: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BPM: tl.constexpr, BNC: tl.constexpr,
              BK: tl.constexpr, NPROG: tl.constexpr, RULE: tl.constexpr, EVENT: tl.constexpr,
              HAS_SCALE: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr, W_BF16: tl.constexpr,
              EMULATE_BF16: tl.constexpr, FOLD: tl.constexpr):
    """Phase M: for each (row tile, block of BPM modes), s = decay s + scale B LN1(h), in place in `state`
    ((ROWS, 2P): [s_re, s_im] a row), and where FOLD a bf16 copy in s16 (ROWS, 2P) for phase Y. win (2P, D) is B
    as [Re; Im] rows (win_f, win_sums, win_shifts: folded, fold.py); coefficients as in `lti.mode_coefficients`."""
    for task in range(pid, (ROWS // BM) * ((P + BPM - 1) // BPM), NPROG):
        rows, _, ps, p_ok = column_tile(task, P, BM, BPM)
        # the coefficients depend on nothing other tasks write: they are computed while the row block is waited for
        if EVENT:
            dt = tl.load(dt_ptr + rows.to(tl.int64) * dt_stride_b + t, mask=rows < B, other=1.0)
        else:
            dt = tl.full((BM,), 1.0, tl.float32)
        decay_re, decay_im, scale_re, scale_im = mode_coefficients(dt, coef_a, coef_b, steps_ptr, ps, p_ok, P, RULE,
                                                                   EVENT)
        block = row_block(task, P, BM, BPM, BR)
        wait_for_rows(done, block, target, NPROG)
        # what the tile reads besides the product's chunks is loaded first, to arrive while the product streams
        mean, rstd = merged_stats(stats, rows, eps, D, BNC, ROWS)
        cell = state + rows[:, None] * (2 * P) + ps[None, :]
        s_re = tl.load(cell, mask=p_ok[None, :], other=0.0)
        s_im = tl.load(cell + P, mask=p_ok[None, :], other=0.0)
        if FOLD:
            u_re, u_im = folded_products(h16, centre, rows, mean, rstd, win_f, win_f + P * D, win_sums,
                                         win_sums + P, win_shifts, win_shifts + P, ps, p_ok, D, BM, BPM, BK, True,
                                         STAGES, EMULATE_BF16)
        else:
            u_re, u_im = normalized_products(h, rows, mean, rstd, norm_g, norm_b, win, win + P * D, ps, p_ok, D, BM,
                                             BPM, BK, True, STAGES, PREC, W_BF16, EMULATE_BF16)
        new_re, new_im = advance_modes(u_re, u_im, s_re, s_im, decay_re, decay_im, scale_re, scale_im, HAS_SCALE)
        tl.debug_barrier()  # threads holding copies of one state element must all read it before anyone writes
        tl.store(cell, new_re, mask=p_ok[None, :])
        tl.store(cell + P, new_im, mask=p_ok[None, :])
        if FOLD:
            copy = s16 + rows[:, None] * (2 * P) + ps[None, :]
            tl.store(copy, new_re.to(tl.bfloat16), mask=p_ok[None, :])
            tl.store(copy + P, new_im.to(tl.bfloat16), mask=p_ok[None, :])
        rows_done(done, block)


@triton.jit
def column_tile(task, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Task number `task` of a phase over (row tiles of BM) x (blocks of BN of N columns: of d_model, modes or
    hidden units): its rows (BM,), column block c, columns cs (BN,) and their mask."""
    n_blocks: tl.constexpr = (N + BN - 1) // BN
    c = task % n_blocks
    cs = c * BN + tl.arange(0, BN)
    return (task // n_blocks) * BM + tl.arange(0, BM), c, cs, cs < N


@triton.jit
def row_block(task, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """The row block (of BR rows, a multiple of BM) that task `task` of `column_tile` works on (with BR = BM: its
    row tile)."""
    return (task // ((N + BN - 1) // BN)) * BM // BR


@triton.jit
def add_to_residual(h, h16, next_stats, rows, c, cs, c_ok, old, delta, ref, D: tl.constexpr, BNC: tl.constexpr,
                    ROWS: tl.constexpr, FOLD: tl.constexpr):
    """h[rows, cs] = old + delta (old: what the tile held), with the tile's LN partials in `next_stats` and where
    FOLD the bf16 copy in h16 centred on ref (BM,) (`centred_copy`)."""
    v = old + delta
    tl.debug_barrier()  # as in mix_modes: every thread has read `old` before any overwrites it
    tl.store(h + rows[:, None] * D + cs[None, :], v, mask=c_ok[None, :])
    tile_stats(next_stats, rows, c, v, cs, D, BNC, ROWS)
    if FOLD:
        centred_copy(h16, rows, cs, c_ok, v, ref, D)


@triton.jit
def read_out_modes(h, h16, centre, stats, next_stats, eps, state, s16, norm_g, norm_b, readout, d_skip, done,
                   target, pid, D: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr, BM: tl.constexpr,
                   BNC: tl.constexpr, BK: tl.constexpr, NPROG: tl.constexpr, STAGES: tl.constexpr,
                   PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr, FOLD: tl.constexpr):
    """Phase Y: for each (row tile, block of BNC columns of d_model), h = h + (C s + D_skip LN1(h)), with the
    new LN2 partials in `next_stats`. readout (D, 2P) is the real map [C_re, -C_im]; where FOLD the product
    reads the state's bf16 copy s16 (the bf16 product rounds s so anyway), and h's copy is centred on LN1's
    means, which become the rows' centres."""
    for task in range(pid, (ROWS // BM) * ((D + BNC - 1) // BNC), NPROG):
        rows, c, cs, c_ok = column_tile(task, D, BM, BNC)
        gain = tl.load(norm_g + cs, mask=c_ok, other=0.0)[None, :]
        bias = tl.load(norm_b + cs, mask=c_ok, other=0.0)[None, :]
        skip = tl.load(d_skip + cs, mask=c_ok, other=0.0)[None, :]
        block = row_block(task, D, BM, BNC, BM)
        wait_for_rows(done, block, target, NPROG)
        old = tl.load(h + rows[:, None] * D + cs[None, :], mask=c_ok[None, :], other=0.0)  # first, as in mix_modes
        mean, rstd = merged_stats(stats, rows, eps, D, BNC, ROWS)
        if FOLD:
            y = plain_product(s16, rows, readout, cs, c_ok, 2 * P, BM, BNC, BK, STAGES, PREC, W_BF16, EMULATE_BF16)
        else:
            y = plain_product(state, rows, readout, cs, c_ok, 2 * P, BM, BNC, BK, STAGES, PREC, W_BF16, EMULATE_BF16)
        a = tl.where(c_ok[None, :], (old - mean[:, None]) * rstd[:, None] * gain + bias, 0.0)
        add_to_residual(h, h16, next_stats, rows, c, cs, c_ok, old, y + skip * a, mean, D, BNC, ROWS, FOLD)
        if FOLD and c == 0:
            tl.store(centre + rows, mean)
        rows_done(done, block)


@triton.jit
def gated_units(h, h16, centre, stats, eps, g, norm_g, norm_b, up_w, up_b, up_f, up_sums, up_bf, done, target, pid,
                D: tl.constexpr, F: tl.constexpr, ROWS: tl.constexpr, BM: tl.constexpr, BFU: tl.constexpr,
                BNC: tl.constexpr, BK: tl.constexpr, NPROG: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr,
                W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr, FOLD: tl.constexpr):
    """Phase U: for each (row tile, block of BFU hidden units), g = (Wv a + bv) * gelu(Wg a + bg) with a = LN2(h),
    into `g` ((ROWS, F), bf16 with bf16 weights: the down-projection rounds it so anyway). up (2F, D) holds Wv
    then Wg (up_f, up_sums, up_bf: folded, fold.py)."""
    for task in range(pid, (ROWS // BM) * ((F + BFU - 1) // BFU), NPROG):
        rows, _, fs, f_ok = column_tile(task, F, BM, BFU)
        block = row_block(task, F, BM, BFU, BM)
        wait_for_rows(done, block, target, NPROG)
        mean, rstd = merged_stats(stats, rows, eps, D, BNC, ROWS)
        if FOLD:
            value, gate = folded_products(h16, centre, rows, mean, rstd, up_f, up_f + F * D, up_sums, up_sums + F,
                                          up_bf, up_bf + F, fs, f_ok, D, BM, BFU, BK, True, STAGES, EMULATE_BF16)
        else:
            value_bias = tl.load(up_b + fs, mask=f_ok, other=0.0)[None, :]
            gate_bias = tl.load(up_b + F + fs, mask=f_ok, other=0.0)[None, :]
            value, gate = normalized_products(h, rows, mean, rstd, norm_g, norm_b, up_w, up_w + F * D, fs, f_ok, D,
                                              BM, BFU, BK, True, STAGES, PREC, W_BF16, EMULATE_BF16)
            value += value_bias
            gate += gate_bias
        units = value * gelu(gate)
        tl.store(g + rows[:, None] * F + fs[None, :], units.to(g.dtype.element_ty), mask=f_ok[None, :])
        rows_done(done, block)


@triton.jit
def project_down(h, h16, centre, next_stats, g, down_w, down_b, done, target, pid, D: tl.constexpr, F: tl.constexpr,
                 ROWS: tl.constexpr, BM: tl.constexpr, BNC: tl.constexpr, BK: tl.constexpr, NPROG: tl.constexpr,
                 STAGES: tl.constexpr, PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr,
                 FOLD: tl.constexpr):
    """Phase Dn: for each (row tile, block of BNC columns of d_model), h = h + (Wdown g + b_down), with the new LN
    partials in `next_stats`. down (D, F). Where FOLD h's copy keeps the rows' centres (phase Y's)."""
    for task in range(pid, (ROWS // BM) * ((D + BNC - 1) // BNC), NPROG):
        rows, c, cs, c_ok = column_tile(task, D, BM, BNC)
        bias = tl.load(down_b + cs, mask=c_ok, other=0.0)[None, :]
        block = row_block(task, D, BM, BNC, BM)
        wait_for_rows(done, block, target, NPROG)
        old = tl.load(h + rows[:, None] * D + cs[None, :], mask=c_ok[None, :], other=0.0)  # first, as in mix_modes
        if FOLD:
            ref = tl.load(centre + rows)
        else:
            ref = tl.full((BM,), 0.0, tl.float32)
        z = plain_product(g, rows, down_w, cs, c_ok, F, BM, BNC, BK, STAGES, PREC, W_BF16, EMULATE_BF16)
        add_to_residual(h, h16, next_stats, rows, c, cs, c_ok, old, z + bias, ref, D, BNC, ROWS, FOLD)
        rows_done(done, block)


# horizon, strides and the rows within the last tile vary from call to call; the widths, tiles, row tiles (ROWS)
# and grid (NPROG) stay specialised
@triton.jit(do_not_specialize=["out_stride_b", "out_stride_t", "dt_stride_b", "B", "n_steps"])
def phased_rollout_kernel(
    out_ptr, out_stride_b, out_stride_t, dt_ptr, dt_stride_b,
    state_ptr, h_ptr, g_ptr, stats_ptr, done_ptr, h16_ptr, centre_ptr, s16_ptr,
    enc_w, enc_b, dec_w, dec_b, final_g, final_b,
    norm1_g, norm1_b, norm2_g, norm2_b, up_w, up_b, down_w, down_b,
    win, readout, d_skip, coef_a, coef_b, steps_ptr,
    dec_wf, dec_sums, dec_bf, win_f, win_sums, win_shifts, up_f, up_sums, up_bf,
    B, n_steps, eps,
    W: tl.constexpr, D: tl.constexpr, F: tl.constexpr, P: tl.constexpr, n_layers: tl.constexpr,
    ROWS: tl.constexpr, RULE: tl.constexpr, EVENT: tl.constexpr, HAS_SCALE: tl.constexpr,
    BM: tl.constexpr, BMM: tl.constexpr, BME: tl.constexpr, BW: tl.constexpr, BNC: tl.constexpr, BPM: tl.constexpr,
    BFU: tl.constexpr, BK: tl.constexpr, BKD: tl.constexpr, NPROG: tl.constexpr, STAGES: tl.constexpr,
    PREC: tl.constexpr, W_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr, FOLD: tl.constexpr,
):
    """Grid (NPROG,), every program resident at once (cooperative launch; see the module doc).

    out (B, n_steps + 1, W) holds x0 in column 0 and receives step t's output in column t + 1; dt (B, n_steps)
    fp32 when EVENT; state (n_layers, ROWS, 2P) fp32, updated in place; h (ROWS, D) fp32 and g (ROWS, F) fp32 or
    bf16 (W_BF16) scratch; stats (2, D / BNC, ROWS, 2) fp32 scratch; done (ROWS / BM,) int32, the row blocks'
    counters of finished tiles (module doc), zeroed before the launch.
    FOLD (bf16 weights): the products after a LayerNorm read a bf16 copy of h less a centre for each row (h16
    (ROWS, D) bf16, centre (ROWS,) fp32) and of the state for phase Y (s16 (ROWS, 2P) bf16), all scratch, and the
    weights with the norms' gains folded in (fold.py): dec_wf (W, D), dec_sums and dec_bf (W,); win_f (L, 2P, D),
    win_sums and win_shifts (L, 2P); up_f (L, 2F, D), up_sums and up_bf (L, 2F).
    ROWS is B rounded up to whole row tiles of BM; phase M takes row tiles of BMM, phase DE of BME (powers of two
    up to BM), the others of BM. Phase Dn reduces in chunks of BKD, the others of BK. Weights as packed by
    `pack.pack_model` for the modal mixer (win = m0, readout = m1, d_skip = m2, coef_a = m3, coef_b = m4,
    steps = m5), stacked over the layers.
    """
    pid = tl.program_id(0)
    NC: tl.constexpr = (D + BNC - 1) // BNC  # column tiles of d_model
    stats_mlp = stats_ptr + 2 * ROWS * NC  # the second buffer: LN2's partials
    # tasks on one row block (BM rows) in each phase, and before each phase of a layer and of a step
    tl.static_assert(BM % BMM == 0 and BM % BME == 0, "phases M and DE take row tiles within the row blocks")
    N_M: tl.constexpr = BM // BMM * ((P + BPM - 1) // BPM)
    N_U: tl.constexpr = (F + BFU - 1) // BFU
    PER_LAYER: tl.constexpr = N_M + 2 * NC + N_U
    PER_STEP: tl.constexpr = BM // BME + n_layers * PER_LAYER
    for t in range(n_steps + 1):
        # int32: wraps as the counters do, and `wait_for_rows` compares differences, which stay within about
        # PER_STEP (a program's tiles on a block recur every step), so wrap-around is harmless
        before = t * PER_STEP
        decode_encode(t, n_steps, out_ptr, out_stride_b, out_stride_t, B, h_ptr, h16_ptr, centre_ptr, stats_ptr, eps,
                      enc_w, enc_b, dec_w, dec_b, final_g, final_b, dec_wf, dec_sums, dec_bf, done_ptr, before, pid, W,
                      D, ROWS, BME, BM, BW, BNC, BK, NPROG, STAGES, PREC, W_BF16, EMULATE_BF16, FOLD)
        if t < n_steps:
            for layer in range(n_layers):
                before = t * PER_STEP + BM // BME + layer * PER_LAYER
                state = state_ptr + layer * (ROWS * 2 * P)
                mix_modes(t, dt_ptr, dt_stride_b, B, h_ptr, h16_ptr, centre_ptr, stats_ptr, eps, state, s16_ptr,
                          norm1_g + layer * D, norm1_b + layer * D, win + layer * (2 * P * D),
                          win_f + layer * (2 * P * D), win_sums + layer * (2 * P), win_shifts + layer * (2 * P),
                          coef_a + layer * (2 * P), coef_b + layer * (2 * P), steps_ptr + layer * P, done_ptr, before,
                          pid, D, P, ROWS, BMM, BM, BPM, BNC, BK, NPROG, RULE, EVENT, HAS_SCALE, STAGES, PREC, W_BF16,
                          EMULATE_BF16, FOLD)
                read_out_modes(h_ptr, h16_ptr, centre_ptr, stats_ptr, stats_mlp, eps, state, s16_ptr,
                               norm1_g + layer * D, norm1_b + layer * D, readout + layer * (2 * P * D),
                               d_skip + layer * D, done_ptr, before + N_M, pid, D, P, ROWS, BM, BNC, BK, NPROG, STAGES,
                               PREC, W_BF16, EMULATE_BF16, FOLD)
                gated_units(h_ptr, h16_ptr, centre_ptr, stats_mlp, eps, g_ptr, norm2_g + layer * D, norm2_b + layer * D,
                            up_w + layer * (2 * F * D), up_b + layer * (2 * F), up_f + layer * (2 * F * D),
                            up_sums + layer * (2 * F), up_bf + layer * (2 * F), done_ptr, before + N_M + NC, pid, D, F,
                            ROWS, BM, BFU, BNC, BK, NPROG, STAGES, PREC, W_BF16, EMULATE_BF16, FOLD)
                project_down(h_ptr, h16_ptr, centre_ptr, stats_ptr, g_ptr, down_w + layer * (D * F),
                             down_b + layer * D, done_ptr, before + N_M + NC + N_U, pid, D, F, ROWS, BM, BNC, BKD,
                             NPROG, STAGES, PREC, W_BF16, EMULATE_BF16, FOLD)
