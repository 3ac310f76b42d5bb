"""A Triton kernel that stores the weight tile `common.load_tile` loads, for the CPU tests (imported under the
interpreter with `tests.helpers.import_interpreted`)."""

from __future__ import annotations

import triton
import triton.language as tl

from lrnn_lightning.rollout.fused.kernels.common import load_tile


@triton.jit
def store_tile(src, row_stride, n_rows, n_cols, out, BN: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr):
    """`load_tile(src, row_stride, rows 0..BN-1 (those < n_rows), n_cols, BK, CH)` written to out (BN, BK) in
    the matrix's own order, whatever the tile's layout."""
    rows = tl.arange(0, BN)
    tile = load_tile(src, row_stride, rows, rows < n_rows, n_cols, BK, CH)
    if CH == 0:
        tl.store(out + rows[:, None] * BK + tl.arange(0, BK)[None, :], tile)
    else:
        ks = (tl.arange(0, BK // CH if CH < BK else 1)[:, None] * (CH if CH < BK else BK)
              + tl.arange(0, CH if CH < BK else BK)[None, :])
        tl.store(out + rows[None, :, None] * BK + ks[:, None, :], tile)


INTERPRETED = not isinstance(store_tile, triton.runtime.jit.JITFunction)
