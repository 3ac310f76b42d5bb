"""`fused_steps` and `fused_rollout`: the whole autoregressive rollout of a SequenceModel as one Triton launch.

    out = fused_rollout(model, context, horizon=200, dt=dt)   # (B, 200, H), same numbers as rollout_loop
    ys = fused_steps(model, x0, state, num_steps=199)         # the step part only, from any state

Per launch: the live weights are packed (`pack.py`; on a GPU a replayed CUDA graph of that
packing, `pack_graph.py`), the prefilled state is laid out in rows, and one kernel runs every
step of every layer (on a GPU, a call shape seen before replays all of that as one CUDA graph,
`call_graph.py`): the register-resident kernel where `registers_fit` says the model fits
its register tiles (LRU, S5, Mamba), else the scratch kernel (`KernelConfig.activations`
overrides); the register kernel may split each row tile's step over several programs
(`KernelConfig.split`, `resolve_split`), launched cooperatively. Wide LRU / S5 models at large
batch take the phased kernel instead (`default_launch`, `phased_launch.py`), whose whole grid
shares every step. The Triton kernel module is imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

import torch
from torch import Tensor, nn

from lrnn_lightning.rollout.checks import (
    check_context,
    check_horizon,
    check_model_output,
    check_rollout_dt,
    check_step_model,
    feature_size,
)
from lrnn_lightning.rollout.fingerprint import model_signature
from lrnn_lightning.rollout.fused.call_graph import CallGraph, CallKey, replayed_call
from lrnn_lightning.rollout.fused.config import (  # noqa: F401 (KernelConfig and default_config live on here)
    ACTIVATIONS,
    BLOCK_BS,
    CPU_PROCESSORS,
    DOT_SPLIT_WARPS,
    MAX_ONE_ROW_PROGRAMS_PER_SM,
    MAX_SPLIT,
    MIN_DOT_SPLIT,
    NARROW_SPLIT_D_MODEL,
    NARROW_SPLIT_WARPS,
    REDUCTION_CHUNK,
    RESIDENT_WARPS,
    SPLIT_LAYER_RULE_MIN_D_MODEL,
    SPLIT_MIN_LAYER_BYTES,
    SPLIT_MIN_WEIGHT_BYTES,
    KernelConfig,
    default_config,
    default_split,
    next_pow2,
    phased_config,
    processor_count,
    small_tile_config,
)
from lrnn_lightning.rollout.fused.fold import FOLDED_KEYS
from lrnn_lightning.rollout.fused.kernel_call import KernelCall, io_buffers
from lrnn_lightning.rollout.fused.pack import (
    MAMBA,
    MIXER_IDS,
    MIXER_NAMES,
    MODAL,
    RGLRU_ID,
    S4D_ID,
    PackedModel,
    rows_to_state,
)
from lrnn_lightning.rollout.fused.pack_graph import pack_live
from lrnn_lightning.rollout.fused.phased_launch import build_phased_call, phased_pays
from lrnn_lightning.rollout.fused.support import KERNEL_MODULE, fused_support
from lrnn_lightning.rollout.inference import rollout_mode
from lrnn_lightning.rollout.state import State

PRECISIONS = ("ieee", "tf32x3", "tf32")
TILE_3D = 512  # elements per warp of the S4D / Mamba state tiles (2048 with 4 warps)
REGISTER_TILE = 512  # elements per warp of one weight tile (and of a small tile's product) in the register kernel
REGISTER_ROWS = 1024  # elements per warp of one (rows, d_model) activation: h, a, y and z are live at once
TILE_RESIDENT, ROW_RESIDENT = 1, 2  # the RESIDENT constexpr of register_rollout_kernel (0: not resident)
RESIDENT_TILES = 4  # register tiles of weights a whole-model-resident program may hold (kernels/resident.py)


class FusedKernelError(RuntimeError):
    """The fused kernel failed to compile or launch (a bug, or a GPU without the resources it needs)."""


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, next_pow2(n)))


def _whole(n: int) -> int:
    """The block that holds all of n (a power of two, at least 16)."""
    return max(16, next_pow2(n))


def kernel_blocks(packed: PackedModel, config: KernelConfig) -> dict[str, int]:
    """The kernel's block-size constexprs for `packed` under `config`."""
    cap, bb = config.block_n, config.block_b
    tile_3d = TILE_3D * config.num_warps
    blocks = {"BK": config.block_k, "BD": _block(packed.d_model, cap), "BW": _block(packed.width, cap),
              "BF": _block(packed.d_ff, cap)}
    mixer = dict.fromkeys(("BM0", "BM1", "BM2", "BM3", "BM4"), 16)
    md = packed.sizes
    if packed.mixer_id == MODAL:
        mixer.update(BM0=_block(2 * md[0], cap), BM1=_block(md[0], cap))
    elif packed.mixer_id == S4D_ID:
        modes = max(2, min(64, next_pow2(md[0])))
        mixer.update(BM0=max(2, min(next_pow2(packed.d_model), tile_3d // (bb * modes))), BM1=modes)
    elif packed.mixer_id == MAMBA:
        inner, n_state, rank, taps = md
        modes = max(2, next_pow2(n_state))
        mixer.update(BM0=_block(inner, cap), BM1=_block(rank + 2 * n_state, cap),
                     BM2=max(2, min(next_pow2(inner), tile_3d // (bb * modes))), BM3=modes, BM4=max(2, next_pow2(taps)))
    elif packed.mixer_id == RGLRU_ID:
        mixer.update(BM0=_block(md[0], cap), BM4=max(2, next_pow2(md[1])))
    return {**blocks, **mixer}


def registers_fit(packed: PackedModel, config: KernelConfig, precision: str = "ieee") -> tuple[bool, str]:
    """Whether the register-resident kernel (kernels/registers.py) can run `packed` under `config`, and why not."""
    if packed.mixer_id not in (MODAL, MAMBA):
        return False, f"it implements LRU, S5 (modal) and Mamba mixers only, not {MIXER_NAMES[packed.mixer_id]}"
    if config.block_b >= 16 and precision == "ieee" and packed.common["up_w"].dtype == torch.float32:
        # Triton's exact-fp32 tl.dot holds whole K-slices of both operands: with the register kernel's
        # d_model-wide tiles it spills (ptxas, sm_90), and the scratch kernel was faster (H100, RESULTS.md)
        return False, "exact-fp32 tl.dot tiles (block_b >= 16) spill its registers"
    bd, bw = _whole(packed.d_model), _whole(packed.width)
    if config.block_b * bd > REGISTER_ROWS * config.num_warps:
        return False, (f"{config.block_b} rows x d_model {packed.d_model} exceed {REGISTER_ROWS} activations "
                       f"a warp ({config.num_warps} warps)")
    budget = REGISTER_TILE * config.num_warps
    warps = f"{config.num_warps} warp{'s' if config.num_warps > 1 else ''}"
    if 16 * max(bd, bw) > budget:
        return False, f"d_model {packed.d_model} / width {packed.width} exceed a {budget}-element tile ({warps})"
    # the encoder and decoder tiles stay in registers for the whole rollout: each may take one tile's budget
    # (d_model 128 x width <= 16 with 4 warps compiled to 255 registers, 8 bytes of stack, and ran fastest on
    # an H100; width 64 spilled 96 bytes with 8 warps: ptxas for sm_90, 2026-11-27)
    if bd * bw > budget:
        return False, (f"the encoder / decoder tile (d_model {packed.d_model} x width {packed.width}) exceeds "
                       f"{budget} elements ({warps})")
    if packed.mixer_id == MAMBA and 16 * config.block_b * _whole(packed.sizes[1]) > budget:
        return False, f"Mamba's d_state {packed.sizes[1]} exceeds a {budget}-element state tile ({warps})"
    return True, ""


def register_blocks(packed: PackedModel, config: KernelConfig, split: int = 1) -> dict[str, int]:
    """Block-size constexprs of the register kernel: whole rows of D and W (and Mamba's N, R and conv
    taps), modes, hidden units and Mamba's channels in blocks of at most `config.block_n` that keep a
    weight tile, a small tile's (rows, block, D) product and Mamba's (rows, block, N) state tile within
    REGISTER_TILE elements a warp (the modal mixer holds four such tiles at once); in a step split over
    `split` programs, small enough that each program gets a block where it can. BX is the width of a
    split step's exchange rows (kernels/group.py)."""
    bd, bw = _whole(packed.d_model), _whole(packed.width)
    budget = REGISTER_TILE * config.num_warps
    per_block = bd * (config.block_b if config.block_b < 16 else 1)
    cap = max(16, min(config.block_n, budget // per_block))

    def block(n: int, limit: int) -> int:
        return _block(n, min(limit, next_pow2(-(-n // split))))

    blocks = {"BD": bd, "BW": bw, "BP": 16, "BF": block(packed.d_ff, cap), "BE": 16, "BR": 16, "BN": 16, "BKC": 2,
              "SPLIT": split, "BX": bd}
    if packed.mixer_id == MODAL:
        blocks["BP"] = block(packed.sizes[0], cap)
    else:
        inner, n_state, rank, taps = packed.sizes
        bn, br = _whole(n_state), _whole(rank)
        blocks.update(BE=block(inner, max(16, min(cap, budget // (config.block_b * bn)))), BR=br,
                      BN=bn, BKC=max(2, next_pow2(taps)), BX=max(bd, br + 2 * bn))
    return blocks


def tagged_exchange(mixer_id: int, block_b: int, exchange_width: int, num_warps: int) -> bool:
    """Whether a split step exchanges through tagged words (kernels/group.py) rather than the counter barrier:
    for LRU / S5 (modal) steps whose (block_b, exchange_width) partials are at most one value a thread.

    A thread waits for its values one after the other, so with more the counter was faster (16 x 128 on 8
    warps: 2.9-3.6 µs an exchange against 1.5-1.9). Mamba's split step at (32, 128, 64, 4) ran 2.5x slower
    tagged on 8 warps (158 against 62 µs a step; 97 against 111 on 4), while the LRU's gained (23.6 against
    27.5 µs; 24.6 against 48.6 on 4 warps): H100, experiments/RESULTS.md, ninth session. Tagging only Mamba's
    y and z exchanges was slower too (134-140 against 63 µs a step at B=32, tenth session)."""
    return mixer_id == MODAL and block_b * exchange_width <= 32 * num_warps


def split_pays(packed: PackedModel, config: KernelConfig) -> bool:
    """Whether an unsplit step of `packed` under `config` streams enough weights to gain from splitting over its
    exchanges (config.py's module doc, where the thresholds were measured): SPLIT_MIN_LAYER_BYTES a layer for
    one-row LRU / S5 steps from d_model 33 on whose exchanges are tagged words, else SPLIT_MIN_WEIGHT_BYTES in
    all; never for a step that keeps its weights in registers (`resident_fits`)."""
    blocks = register_blocks(packed, config)
    if resident_fits(packed, config, blocks):
        return False
    if (config.block_b == 1 and blocks["BD"] >= SPLIT_LAYER_RULE_MIN_D_MODEL
            and tagged_exchange(packed.mixer_id, config.block_b, blocks["BX"], config.num_warps)):
        return weight_bytes(packed) >= SPLIT_MIN_LAYER_BYTES * packed.n_layers
    return weight_bytes(packed) >= SPLIT_MIN_WEIGHT_BYTES


def resident_fits(packed: PackedModel, config: KernelConfig, blocks: dict[str, int]) -> bool:
    """Whether the register kernel runs `packed` whole-model-resident (kernels/resident.py): a one-layer
    LRU / S5 model, unsplit, whose modes and hidden units each fit one block of `blocks` (`register_blocks`)
    and whose weight tiles (4 of modes x d_model, 3 of hidden units x d_model) fit RESIDENT_TILES tiles."""
    if packed.mixer_id != MODAL or packed.n_layers != 1 or blocks["SPLIT"] != 1:
        return False
    if packed.sizes[0] > blocks["BP"] or packed.d_ff > blocks["BF"]:
        return False
    elements = (4 * blocks["BP"] + 3 * blocks["BF"]) * blocks["BD"]
    return elements <= RESIDENT_TILES * REGISTER_TILE * config.num_warps


def split_blocks(packed: PackedModel) -> int:
    """Blocks of 16 in the register kernel's widest split loop (modes, Mamba channels or MLP hidden units)."""
    return -(-max(packed.d_ff, packed.sizes[0]) // 16)


def weight_bytes(packed: PackedModel) -> int:
    """Bytes of packed weights (and parameters) one step of one row streams: each weight once."""
    # "columns" repeats the encoder, readout and down-projection, transposed (pack.transposed_columns); the
    # folded weights (fold.py) stand in for their unfolded copies in phased steps; one-element mixer slots are
    # the unused ones' placeholders
    tensors = [t for key, t in packed.common.items() if key != "columns" and key not in FOLDED_KEYS]
    tensors += [t for t in packed.mixer if isinstance(t, Tensor) and t.numel() > 1]
    return sum(t.numel() * t.element_size() for t in tensors)


def uses_registers(packed: PackedModel, config: KernelConfig, precision: str = "ieee") -> bool:
    """Which kernel `config.activations` picks for `packed`; "registers" where they do not fit is an error."""
    if config.activations not in ACTIVATIONS:
        raise ValueError(f"fused_steps: activations must be one of {ACTIVATIONS}, got {config.activations!r}.")
    if config.activations in ("scratch", "phased"):
        return False
    fits, why = registers_fit(packed, config, precision)
    if config.activations == "registers" and not fits:
        raise ValueError(f"fused_steps: activations='registers' cannot run this model: {why}. "
                         "HINT: activations='auto' takes the scratch kernel where registers do not fit.")
    return fits


def kernel_module():
    """The Triton kernel module, imported on first use (compiled or interpreted, as Triton decides then)."""
    try:
        return importlib.import_module(KERNEL_MODULE)
    except ImportError as error:
        raise FusedKernelError(f"fused rollout: cannot import the Triton kernel ({error}). "
                               "HINT: pip install triton, or use the graph or loop backend.") from error


def fused_steps(model: nn.Module, x0: Tensor, state: State | None, num_steps: int, dt_steps: Tensor | None = None,
                *, weight_dtype: torch.dtype | None = None, precision: str = "ieee",
                config: KernelConfig | None = None, return_state: bool = False,
                packed: PackedModel | None = None, signature: tuple | None = None) -> Tensor | tuple[Tensor, State]:
    """`num_steps` fed-back steps of `model` from `x0` and `state` in one kernel launch (like `run_steps`).

    Args:
        model: a SequenceModel the kernel covers (see `fused_support`), in eval semantics.
        x0: input of the first step, (B, W).
        state: the model's state (keys of `allocate_state`, e.g. from `prefill`); None for zeros. Not modified.
        num_steps: steps to run, >= 0.
        dt_steps: (B, num_steps) event timesteps, column k for step k, or None.
        weight_dtype: dtype of the matmul weights in the kernel: torch.float32 or torch.bfloat16
            (None: the model's). Activations, state and accumulation stay float32.
        precision: tl.dot input precision for float32 weights: "ieee" (exact fp32 FMA), "tf32x3"
            (tensor cores, about fp32 accuracy) or "tf32" (tensor cores, ~1e-3). Tiles of fewer
            than 16 rows (`config.block_b` 1-8) do not use tl.dot and compute exact fp32 anyway,
            with bf16 weights widened to fp32.
        config: launch shape; None picks one from the batch size, the GPU's SM count and the model
            (`default_launch`).
        return_state: also return the state after the last step.
        packed: weights already packed by `pack_model(model, weight_dtype, event, fold)`, used as they
            are: the caller answers for their freshness (benchmarks; None packs the live weights). Phased
            steps on bf16 weights packed without `fold` normalise every chunk (slower, as exact).
        signature: `fingerprint.model_signature(model)` if the caller has just taken it, with no tensor
            replaced or module swapped since (RolloutEngine's backend choice); None takes it here.

    Returns:
        (B, num_steps, W) outputs in x0's dtype, and the final state if asked.
    """
    # one walk over the model serves the support check and the graph cache
    signature = signature or model_signature(model)
    ok, why = fused_support(model, weight_dtype, signature=signature)
    if not ok:
        raise ValueError(f"fused_steps: the fused kernel cannot run this model: {why}. "
                         "HINT: use RolloutEngine's graph or loop backend (generation.fused=auto falls back).")
    # fused_support made sure that every parameter has this dtype and device
    param_dtype, param_device = model.encoder.weight.dtype, model.encoder.weight.device
    weight_dtype = weight_dtype or param_dtype
    if precision not in PRECISIONS:
        raise ValueError(f"fused_steps: precision must be one of {PRECISIONS}, got {precision!r}. "
                         "HINT: 'ieee' matches the step loop to fp32 rounding.")
    batch, width = x0.shape if x0.dim() == 2 else (None, None)
    if batch is None or width != model.d_input or x0.device != param_device:
        raise ValueError(f"fused_steps: expected x0 of shape (B, {model.d_input}) on {param_device}, got "
                         f"{tuple(x0.shape)} on {x0.device}.")
    event = dt_steps is not None
    if event and tuple(dt_steps.shape) != (batch, num_steps):
        raise ValueError(f"fused_steps: expected dt_steps of shape ({batch}, {num_steps}), "
                         f"got {tuple(dt_steps.shape)}.")
    if config is not None:
        check_config(config)
    if num_steps == 0:
        empty = x0.new_empty(batch, 0, width)
        return (empty, _copy_state(state, model, batch, x0)) if return_state else empty

    kernels = kernel_module()
    # the interpreter runs one program at a time, whatever device the tensors are on
    n_sms = CPU_PROCESSORS if kernels.INTERPRETED else processor_count(x0.device)
    fold = weight_dtype == torch.bfloat16 and (config.activations == "phased" if config is not None else
                                               phased_pays(MIXER_IDS[type(model.layers[0].mixer)], model.d_model,
                                                           batch, n_sms, weight_dtype, precision))
    with torch.no_grad():
        graph = None
        if packed is None and x0.device.type == "cuda" and not kernels.INTERPRETED \
                and not torch.cuda.is_current_stream_capturing():
            key = CallKey.of(x0, state, num_steps, dt_steps, weight_dtype, precision, config)

            def launch(packing: PackedModel, static_x0: Tensor, static_state: State | None,
                       static_dt: Tensor | None) -> KernelCall:  # run inside the capture, on the graph's inputs
                chosen = config or default_launch(packing, batch, weight_dtype, precision, n_sms)
                return build_call(packing, static_x0, static_state, num_steps, static_dt, precision, chosen,
                                  interpreted=False)

            graph = replayed_call(model, signature, key, lambda: CallGraph(model, x0, state, dt_steps, weight_dtype,
                                                                            fold, launch, kernels))
        if graph is not None:
            out, states = graph.replay(x0, state, dt_steps)
        else:
            packed = packed or pack_live(model, weight_dtype, event, fold)
            config = config or default_launch(packed, batch, weight_dtype, precision, n_sms)
            out, states = _launch(kernels, packed, x0, state, num_steps, dt_steps, precision, config)
    # a replayed call's buffers are overwritten by its next replay: copy out of them
    result = out[:, 1:].to(x0.dtype, copy=graph is not None)
    if not return_state:
        return result
    template = model.allocate_state(1, torch.device("meta"), torch.float32)  # shapes only
    states = states[:, :batch].clone() if graph is not None else states[:, :batch]
    final: State = {}
    for layer in range(states.shape[0]):
        like = {key[len(f"{layer}."):]: value for key, value in template.items() if key.startswith(f"{layer}.")}
        for key, value in rows_to_state(MIXER_IDS[type(model.layers[layer].mixer)], states[layer], like).items():
            final[f"{layer}.{key}"] = value.to(x0.dtype)
    return result, final


def check_config(config: KernelConfig) -> None:
    """A ValueError naming the bad field of a user-given launch shape."""
    if config.block_b not in BLOCK_BS:
        raise ValueError(f"fused_steps: block_b must be one of {BLOCK_BS}, got {config.block_b}. HINT: 1-8 rows per "
                         "program multiply without tl.dot (small batches), 16-64 with it.")
    if config.activations not in ACTIVATIONS:
        raise ValueError(f"fused_steps: activations must be one of {ACTIVATIONS}, got {config.activations!r}. "
                         "HINT: 'auto' keeps activations in registers where the model fits.")
    if config.num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"fused_steps: num_warps must be a power of two from 1 to 32, got {config.num_warps}. "
                         "HINT: 4 or 8.")
    for name in ("block_n", "block_k"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"fused_steps: {name} must be a power of two >= 16, got {value}.")
    if config.split is not None and (not isinstance(config.split, int) or not 1 <= config.split <= MAX_SPLIT):
        raise ValueError(f"fused_steps: split must be None or an int from 1 to {MAX_SPLIT}, got {config.split!r}. "
                         "HINT: None lets default_split choose.")


def _copy_state(state: State | None, model: nn.Module, batch: int, x0: Tensor) -> State:
    fresh = model.allocate_state(batch, x0.device, x0.dtype)
    if state is not None:
        for key, value in state.items():
            fresh[key].copy_(value)
    return fresh


def resolve_split(packed: PackedModel, config: KernelConfig, tiles: int, device: torch.device,
                  interpreted: bool, n_sms: int | None = None) -> int:
    """The register kernel's programs per row tile under `config` (see `KernelConfig.split`); by default
    (split None) `default_split`'s choice for small tiles (block_b < 16, where it was measured) whose step
    is worth splitting (`split_pays`), else 1.
    n_sms: the SMs the launch may fill (None: `device`'s)."""
    n_sms = n_sms or processor_count(device)
    if config.split is None:
        if interpreted or config.block_b >= 16 or not split_pays(packed, config):
            return 1
        return default_split(tiles, n_sms, split_blocks(packed))
    if config.split > 1 and interpreted:
        raise ValueError(f"fused_steps: split={config.split} needs a GPU: its programs wait for each other, and "
                         "the Triton interpreter runs one program at a time. HINT: split=1 (or None).")
    if config.split > 1 and tiles * config.split > n_sms:
        raise ValueError(f"fused_steps: split={config.split} x {tiles} row tiles = {tiles * config.split} programs, "
                         f"more than the {n_sms} SMs that can hold them all at once (a split step's programs wait "
                         "for each other). HINT: a smaller split, a larger block_b, or split=None.")
    return config.split


def default_launch(packed: PackedModel, batch: int, weight_dtype: torch.dtype, precision: str,
                   n_sms: int) -> KernelConfig:
    """The launch shape `fused_steps` takes without a config: `default_config` for the batch, refined by what
    it knows of the model (config.py's module doc has the measurements):

    - a tl.dot tile whose model does not fit the register kernel (Mamba's state tiles of 16 rows) would
      run the scratch kernel: up to MAX_ONE_ROW_PROGRAMS_PER_SM rows per SM, one-row programs instead;
    - a tl.dot tile in registers splits its step over default_split's programs (with DOT_SPLIT_WARPS warps
      where the model still fits them) where at least MIN_DOT_SPLIT of them fit each tile (tiles *
      MIN_DOT_SPLIT <= SMs);
    - a one-layer LRU / S5 model that runs resident (kernels/resident.py) takes RESIDENT_WARPS warps;
    - a one-row LRU / S5 step that splits, up to d_model NARROW_SPLIT_D_MODEL, takes NARROW_SPLIT_WARPS;
    - an LRU / S5 model from a padded d_model of PHASED_MIN_D_MODEL on, past MAX_ONE_ROW_PROGRAMS_PER_SM rows
      per SM, takes phased steps (`phased_config`, kernels/phased.py), as does one of a padded d_model of 128
      (d_model 65-128) where `phased_launch.phased_pays` says so.
    """
    if phased_pays(packed.mixer_id, packed.d_model, batch, n_sms, weight_dtype, precision):
        return phased_config(weight_dtype, packed.d_model)
    config = default_config(batch, weight_dtype, precision, n_sms=n_sms, d_model=packed.d_model)
    tiles = -(-batch // config.block_b)
    if config.block_b >= 16:
        if not registers_fit(packed, config, precision)[0]:
            one_row = replace(small_tile_config(1), num_warps=4)
            if -(-batch // n_sms) <= MAX_ONE_ROW_PROGRAMS_PER_SM and registers_fit(packed, one_row, precision)[0]:
                return one_row
            return config
        if packed.mixer_id in (MODAL, MAMBA) and tiles * MIN_DOT_SPLIT <= n_sms:
            split = default_split(tiles, n_sms, split_blocks(packed)) if split_pays(packed, config) else 1
            if split >= MIN_DOT_SPLIT:
                # 4 warps measured faster, but half the warps hold half the registers: wide inputs may not fit
                for num_warps in (DOT_SPLIT_WARPS, config.num_warps):
                    candidate = replace(config, split=split, num_warps=num_warps)
                    if registers_fit(packed, candidate, precision)[0]:
                        return candidate
        return config
    narrow = replace(config, num_warps=RESIDENT_WARPS)
    if registers_fit(packed, narrow, precision)[0] and resident_fits(packed, narrow, register_blocks(packed, narrow)):
        return narrow
    narrow = replace(config, num_warps=NARROW_SPLIT_WARPS)
    # (split_pays on `config` too: a model resident on its 8 warps stays so)
    if (packed.mixer_id == MODAL and config.block_b == 1 and _whole(packed.d_model) <= NARROW_SPLIT_D_MODEL
            and registers_fit(packed, narrow, precision)[0] and split_pays(packed, config)
            and split_pays(packed, narrow) and default_split(tiles, n_sms, split_blocks(packed)) > 1):
        return narrow
    return config


def build_call(packed: PackedModel, x0: Tensor, state: State | None, num_steps: int, dt_steps: Tensor | None,
               precision: str, config: KernelConfig, interpreted: bool, n_sms: int | None = None) -> KernelCall:
    """Allocate the output, scratch and state buffers of one launch and assemble the arguments of the kernel
    `config.activations` picks (`uses_registers`); n_sms: the SMs of the GPU it is for (None: x0's device's,
    see `resolve_split`; `aot` builds for a GPU it does not have)."""
    if config.activations == "phased":
        return build_phased_call(packed, x0, state, num_steps, dt_steps, precision, config, interpreted,
                                 n_sms or processor_count(x0.device))
    device, f32 = x0.device, torch.float32
    batch, width = x0.shape
    bb = config.block_b
    n_prog = -(-batch // bb)  # row tiles
    n_layers, d_model, d_ff = packed.n_layers, packed.d_model, packed.d_ff

    # state layout (L, programs * BB, state_width): program p owns rows [p BB, (p + 1) BB) of every layer
    out, dt, states = io_buffers(packed, x0, state, num_steps, dt_steps, n_prog * bb)

    c = packed.common
    io = (out, out.stride(0), out.stride(1), dt, dt.stride(0) if dt_steps is not None else 0)
    weights = (c["enc_w"], c["enc_b"], c["dec_w"], c["dec_b"], c["final_g"], c["final_b"], c["norm1_g"],
               c["norm1_b"], c["norm2_g"], c["norm2_b"], c["up_w"], c["up_b"], c["down_w"], c["down_b"],
               *packed.mixer, batch, num_steps, width, d_model, d_ff, n_layers, *packed.sizes, packed.eps)
    constexprs = dict(MIXER=packed.mixer_id, RULE=packed.rule, EVENT=dt_steps is not None, HAS_SCALE=packed.has_scale,
                      BB=bb, PREC=precision, W_BF16=c["up_w"].dtype == torch.bfloat16, EMULATE_BF16=interpreted)
    if uses_registers(packed, config, precision):
        split = resolve_split(packed, config, n_prog, device, interpreted, n_sms)
        blocks = register_blocks(packed, config, split)
        # 2: one row a program, on vectors (resident_row_steps); 1: a tile of rows (resident_modal_steps)
        resident = resident_fits(packed, config, blocks)
        blocks["RESIDENT"] = 0 if not resident else ROW_RESIDENT if bb == 1 else TILE_RESIDENT
        columns = c["columns"] if blocks["RESIDENT"] == ROW_RESIDENT else c["enc_w"]  # else unused
        # Mamba's conv outputs cross between its two passes through these rows (kernels/register_mamba.py)
        mixer_rows = torch.empty(n_prog * split * bb, packed.sizes[0] if packed.mixer_id == MAMBA else 1,
                                 device=device, dtype=f32)
        # the exchanges' slots (int64 tagged words or fp32 values) and counters (kernels/group.py), zeroed by
        # every launch (a captured call replays the zeroing)
        part = torch.empty(n_prog * 2 * split * bb * blocks["BX"] if split > 1 else 1, device=device, dtype=torch.int64)
        sem = torch.empty(n_prog, device=device, dtype=torch.int32)
        blocks["TAGGED"] = tagged_exchange(packed.mixer_id, bb, blocks["BX"], config.num_warps)
        # one-row programs sum bf16 weight tiles faster chunked (kernels/common.py); fp32 ones did not gain, and
        # resident launches hold their own tiles
        chunked = bb == 1 and c["up_w"].dtype == torch.bfloat16 and not blocks["RESIDENT"]
        blocks["CHUNK"] = REDUCTION_CHUNK if chunked else 0
        args = (*io, states, states.stride(0), packed.state_width, mixer_rows, part, sem, columns, *weights)
        return KernelCall("register_rollout_kernel", (n_prog * split,), args, {**constexprs, **blocks},
                          config.num_warps, out, states, cooperative=split > 1,
                          zeroed=(part, sem) if split > 1 else ())
    if config.split not in (None, 1):
        raise ValueError(f"fused_steps: split={config.split} splits the register kernel's steps, but this launch "
                         "takes the scratch kernel (see registers_fit). HINT: split=None.")
    scratch = torch.zeros(n_prog, bb * (3 * d_model + d_ff + packed.scratch_width), device=device, dtype=f32)
    args = (*io, scratch, scratch.stride(0), states, bb * packed.state_width, states.stride(0), packed.state_width,
            *weights)
    return KernelCall("fused_rollout_kernel", (n_prog,), args, {**constexprs, **kernel_blocks(packed, config)},
                      config.num_warps, out, states)


def _launch(kernels, packed: PackedModel, x0: Tensor, state: State | None, num_steps: int, dt_steps: Tensor | None,
            precision: str, config: KernelConfig) -> tuple[Tensor, Tensor]:
    """Launch eagerly; returns the (B, T + 1, W) output and (L, rows, state_width) state buffers."""
    if x0.device.type != "cuda" and not kernels.INTERPRETED:
        raise ValueError(f"fused_steps: tensors on {x0.device}; the compiled kernel needs a CUDA GPU. "
                         "HINT: set TRITON_INTERPRET=1 before importing the kernel to interpret it on the CPU.")
    call = build_call(packed, x0, state, num_steps, dt_steps, precision, config, kernels.INTERPRETED)
    try:
        call.launch(kernels)
    except Exception as error:
        hint = ("KernelConfig(block_b=32, block_n=64, block_k=32, num_warps=4, activations='phased') needs fewer "
                "resources and activations='scratch' takes the scratch kernel" if call.kernel == "phased_rollout_kernel"
                else "a smaller KernelConfig(block_b=16, block_n=32, block_k=16) needs fewer resources, "
                "activations='scratch' takes the other kernel and split=1 launches without co-residency")
        raise FusedKernelError(
            f"fused rollout kernel {call.kernel} failed ({type(error).__name__}: {str(error).strip()[:2000]}) with "
            f"{call.constexprs}, num_warps={call.num_warps}, {call.grid[0]} programs. HINT: {hint}; or use the "
            "graph backend."
        ) from error
    return call.out, call.states


def fused_rollout(model: nn.Module, context: Tensor, horizon: int, dt: Tensor | None = None, *,
                  weight_dtype: torch.dtype | None = None, precision: str = "ieee",
                  config: KernelConfig | None = None) -> Tensor:
    """Prefill `context` in PyTorch, then roll out `horizon` steps in one fused kernel.

    Same contract as `RolloutEngine.rollout`: out[:, 0] is the prefill's last output and
    out[:, k] the model's step on out[:, k - 1] with timestep dt[:, C + k - 1].

    Args:
        model: a covered SequenceModel (see `fused_support`).
        context: (B, C, W) on the model's device and dtype.
        horizon: outputs to produce, >= 1.
        dt: event timesteps (B, C + horizon) or None; the last column is not consumed.
        weight_dtype, precision, config: see `fused_steps`.

    Returns:
        (B, horizon, W) in the context's dtype.

    Example:
        >>> out = fused_rollout(model.cuda(), context.cuda(), horizon=200)
    """
    owner = "fused_rollout"
    check_step_model(model, owner)
    batch, context_len, width = check_context(context, feature_size(model, owner), model, owner)
    horizon = check_horizon(horizon, owner)
    check_rollout_dt(dt, batch, context_len + horizon, dt is not None, context.device, owner)
    with rollout_mode(model, context.device.type):
        y_context, state = model.prefill(context, None if dt is None else dt[:, :context_len])
        check_model_output(y_context, batch, context_len, width, type(model).__name__)
        first = y_context[:, -1].to(context.dtype)
        dt_steps = None if dt is None else dt[:, context_len:context_len + horizon - 1]
        rest = fused_steps(model, first, state, horizon - 1, dt_steps, weight_dtype=weight_dtype,
                           precision=precision, config=config)
    return torch.cat([first.unsqueeze(1), rest], dim=1)
