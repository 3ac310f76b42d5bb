"""The phased kernel's launch (kernels/phased.py): its tiles, its scratch buffers and its `KernelCall`.

    config = KernelConfig(block_b=64, block_n=64, block_k=64, num_warps=4, activations="phased")
    out = fused_steps(model, x0, state, num_steps=255, config=config)

`KernelConfig` fields mean here: block_b the rows of a tile (16, 32 or 64: tl.dot), block_n
its columns of d_model (its MLP hidden units: 2 block_n), block_k the reduction chunk; split
does not apply. The modes' phase and decoding and encoding take their own tiles: on fp32
weights modes in blocks of block_n / 2 on half as many rows (at least 16) and decoding on 16
rows; on bf16 weights modes in blocks of block_n on 16 rows, decoding on min(32, block_b), and
the down-projection reduces in chunks of 2 block_k (`phased_blocks`). bf16 weights packed with
`fold` (pack.pack_model) take the folded products (fold.py). The grid is one program an SM, or as many
as the widest phase has tasks, if fewer. The batch is specialised in whole row tiles (the
kernel compiles once per row-tile count and grid).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lrnn_lightning.rollout.fused.config import (
    DOT_BLOCK_BS,
    MAX_ONE_ROW_PROGRAMS_PER_SM,
    MIN_DOT_SPLIT,
    PHASED_MIN_D_MODEL,
    PHASED_NARROW_D_MODEL,
    KernelConfig,
    next_pow2,
)
from lrnn_lightning.rollout.fused.fold import FOLDED_KEYS
from lrnn_lightning.rollout.fused.kernel_call import KernelCall, io_buffers
from lrnn_lightning.rollout.fused.pack import MIXER_NAMES, MODAL, PackedModel
from lrnn_lightning.rollout.state import State

PHASED_STAGES = 3  # software-pipelined stages of each tile's reduction loop (tl.range num_stages)


def phased_pays(mixer_id: int | None, d_model: int, batch: int, n_sms: int, weight_dtype: torch.dtype,
                precision: str) -> bool:
    """Whether phased steps cover and pay for a rollout of `batch` rows on `n_sms` SMs (config.py's module doc has
    the measurements): an LRU / S5 model (mixer_id MODAL) past MAX_ONE_ROW_PROGRAMS_PER_SM rows per SM, from a
    padded d_model of PHASED_MIN_D_MODEL on; at a padded d_model of PHASED_NARROW_D_MODEL (d_model 65-128) on exact
    fp32 weights ("ieee"), or on bf16 weights where the register kernel's 16-row tiles are too many to split
    MIN_DOT_SPLIT ways (`launch.default_launch`; B > 528 on 132 SMs). Narrower models, and tf32 dots at d_model 128,
    keep the register kernel's tiles."""
    rows_per_sm = -(-batch // n_sms)
    if mixer_id != MODAL or rows_per_sm <= MAX_ONE_ROW_PROGRAMS_PER_SM:
        return False
    width = next_pow2(d_model)
    if width >= PHASED_MIN_D_MODEL:
        return True
    if width != PHASED_NARROW_D_MODEL:
        return False
    if weight_dtype == torch.bfloat16:
        return -(-batch // DOT_BLOCK_BS[0]) * MIN_DOT_SPLIT > n_sms
    return precision == "ieee"


def check_phased(packed: PackedModel, config: KernelConfig) -> None:
    """A ValueError where the phased kernel cannot run `packed` under `config`."""
    if packed.mixer_id != MODAL:
        raise ValueError(f"fused_steps: activations='phased' implements LRU and S5 (modal) mixers only, not "
                         f"{MIXER_NAMES[packed.mixer_id]}. HINT: activations='auto'.")
    if config.block_b not in DOT_BLOCK_BS:
        raise ValueError(f"fused_steps: activations='phased' multiplies tiles with tl.dot: block_b must be one of "
                         f"{DOT_BLOCK_BS}, got {config.block_b}. HINT: block_b=64 at large batch.")
    if config.split not in (None, 1):
        raise ValueError(f"fused_steps: split={config.split} splits the register kernel's steps; the phased kernel "
                         "spreads every step over the whole grid already. HINT: split=None.")


def phased_blocks(packed: PackedModel, config: KernelConfig) -> dict[str, int]:
    """The phased kernel's tile constexprs for `packed` under `config` (module doc)."""
    columns = max(16, min(config.block_n, next_pow2(max(packed.d_model, packed.d_ff))))
    modes, hidden = next_pow2(packed.sizes[0]), max(16, next_pow2(packed.d_ff))
    chunk = config.block_k
    if packed.common["up_w"].dtype == torch.bfloat16:
        # H100, (1024, 512, 128, 8), µs a step (RESULTS.md, thirteenth session): the modes' phase on 16-row tiles of
        # `columns` modes, decoding on 32-row tiles and the down-projection in chunks of 2 block_k: 278 -> 249
        mode_rows, mode_columns, decode_rows, down_chunk = 16, columns, min(32, config.block_b), 2 * chunk
    else:
        # phases M and DE read whole rows of h for narrow outputs (modes; the decoder and encoder): smaller row
        # tiles spread them over more programs
        mode_rows, mode_columns, decode_rows, down_chunk = max(16, config.block_b // 2), columns // 2, 16, chunk
    return {"BM": config.block_b, "BMM": mode_rows, "BME": decode_rows,
            "BW": max(16, next_pow2(packed.width)),
            "BNC": min(columns, max(16, next_pow2(packed.d_model))),
            "BPM": max(16, min(mode_columns, modes)),
            "BFU": min(2 * columns, hidden), "BK": chunk, "BKD": max(16, min(down_chunk, hidden)),
            "STAGES": PHASED_STAGES}


def phase_tiles(packed: PackedModel, blocks: dict[str, int], rows: int) -> int:
    """Tasks of the widest phase for `rows` (whole row tiles of BM), each phase on its own row tiles (BM; BMM for
    the modes, BME for decoding and encoding): the most programs that all have work at once."""
    d, f, p = packed.d_model, packed.d_ff, packed.sizes[0]
    return max(rows // blocks["BM"] * max(-(-d // blocks["BNC"]), -(-f // blocks["BFU"])),
               rows // blocks["BMM"] * -(-p // blocks["BPM"]), rows // blocks["BME"])


def check_offsets(packed: PackedModel, rows: int) -> None:
    """A ValueError where an element offset of the phased kernel's scratch or weights would pass int32 (it indexes
    them with 32-bit rows and layers)."""
    d, f, p, layers = packed.d_model, packed.d_ff, packed.sizes[0], packed.n_layers
    largest = max(layers * rows * 2 * p, rows * max(d, f), layers * 2 * f * d, layers * 2 * p * d)
    if largest >= 2 ** 31:
        raise ValueError(f"fused_steps: activations='phased' indexes with 32-bit offsets, and this launch needs "
                         f"{largest} elements in one buffer ({rows} rows, d_model {d}, {f} hidden units, {p} modes, "
                         f"{layers} layers). HINT: roll out fewer rows at a time.")


def build_phased_call(packed: PackedModel, x0: Tensor, state: State | None, num_steps: int, dt_steps: Tensor | None,
                      precision: str, config: KernelConfig, interpreted: bool, n_sms: int) -> KernelCall:
    """Allocate the phased kernel's output, state and scratch buffers and assemble its arguments; the grid is
    at most `n_sms` programs (1 in the interpreter, which runs one program at a time and cannot wait)."""
    check_phased(packed, config)
    device, f32 = x0.device, torch.float32
    batch, width = x0.shape
    blocks = phased_blocks(packed, config)
    rows = -(-batch // blocks["BM"]) * blocks["BM"]
    check_offsets(packed, rows)
    n_prog = 1 if interpreted else max(1, min(n_sms, phase_tiles(packed, blocks, rows)))
    d_model, d_ff, n_modes = packed.d_model, packed.d_ff, packed.sizes[0]
    w_bf16 = packed.common["up_w"].dtype == torch.bfloat16

    out, dt, states = io_buffers(packed, x0, state, num_steps, dt_steps, rows)
    h = torch.empty(rows, d_model, device=device, dtype=f32)
    units = torch.empty(rows, d_ff, device=device, dtype=torch.bfloat16 if w_bf16 else f32)
    stats = torch.empty(2, -(-d_model // blocks["BNC"]), rows, 2, device=device, dtype=f32)
    done = torch.zeros(rows // blocks["BM"], device=device, dtype=torch.int32)  # each row block's finished tiles
    c = packed.common
    fold = w_bf16 and FOLDED_KEYS[0] in c  # packed with fold: see `pack.pack_model`
    if fold:  # bf16 products read bf16 copies of h and the state, and weights with the norms folded in (fold.py)
        copies = (torch.empty(rows, d_model, device=device, dtype=torch.bfloat16),
                  torch.empty(rows, device=device, dtype=f32),
                  torch.empty(rows, 2 * n_modes, device=device, dtype=torch.bfloat16))
        folded = tuple(c[key] for key in FOLDED_KEYS)
    else:
        unused = torch.empty(1, device=device, dtype=f32)  # never read
        copies, folded = (unused,) * 3, (unused,) * 9

    win, readout, d_skip, coef_a, coef_b, steps = packed.mixer[:6]
    args = (out, out.stride(0), out.stride(1), dt, dt.stride(0) if dt_steps is not None else 0,
            states, h, units, stats, done, *copies,
            c["enc_w"], c["enc_b"], c["dec_w"], c["dec_b"], c["final_g"], c["final_b"],
            c["norm1_g"], c["norm1_b"], c["norm2_g"], c["norm2_b"], c["up_w"], c["up_b"], c["down_w"], c["down_b"],
            win, readout, d_skip, coef_a, coef_b, steps, *folded, batch, num_steps, packed.eps)
    constexprs = dict(W=width, D=d_model, F=d_ff, P=n_modes, n_layers=packed.n_layers, ROWS=rows, RULE=packed.rule,
                      EVENT=dt_steps is not None, HAS_SCALE=packed.has_scale, NPROG=n_prog, PREC=precision,
                      W_BF16=w_bf16, EMULATE_BF16=interpreted, FOLD=fold, **blocks)
    return KernelCall("phased_rollout_kernel", (n_prog,), args, constexprs, config.num_warps, out, states,
                      cooperative=n_prog > 1, zeroed=(done,), num_stages=PHASED_STAGES)
