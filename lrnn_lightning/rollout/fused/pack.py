"""Live weights -> the flat tensors the fused kernel reads, rebuilt at every launch.

Per-layer tensors are stacked over layers (leading dim L). Weight matrices that feed
tl.dot are cast to the kernel's weight dtype (float32 or bfloat16); everything else
(biases, norms, discretised coefficients, conv taps) stays float32. Every derived tensor
(discretised decays, folded input gains, -exp(A_log), ...) is computed here from the
live parameters through the mixers' own formulas, so an optimizer step between two
launches is always seen. The coefficients come from the parameters stacked over layers (the
mixers' `stacked_*` methods): each op is a node of every fused call's CUDA graph, and an
8-layer LRU / S5 model packs in about 45 ops instead of 160 (0.22 ms instead of 0.4 on an H100).

Mixer slots (m0..m8) and sizes (md0..md3), per kernel MIXER id:

    0 LRU / S5   m0 B (2P, D), m1 readout c[C_re, -C_im] (D, 2P), m2 D_skip (D,),
                 m3 decay (2, P) or, in event mode, zeta (2, P), m4 scale (2, P) or lam (2, P),
                 m5 Delta (P,);                                           md0 = P
    1 S4D        m0 decay or zeta (2, D, N), m1 scale or A (2, D, N), m2 C (2, D, N),
                 m3 D_skip (D,);                                          md0 = N
    2 Mamba      m0 in_proj (2E, D), m1 conv w (E, K), m2 conv b (E,), m3 x_proj (R+2N, E),
                 m4 dt_proj w (E, R), m5 dt_proj b (E,), m6 -exp(A_log) (E, N), m7 D (E,),
                 m8 out_proj (D, E);                                      md = E, N, R, K
    3 RG-LRU     m0 in_proj w (2W, D), m1 in_proj b, m2 conv w (W, K), m3 conv b, m4 gates w (2W, W),
                 m5 gates b, m6 c * logsigmoid(Lambda) (W,), m7 out_proj w (D, W), m8 out_proj b;
                                                                          md = W, K
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from lrnn_lightning.models.backbone import SequenceModel
from lrnn_lightning.models.lru import LRU
from lrnn_lightning.models.mamba import Mamba
from lrnn_lightning.models.rglru import RGLRU
from lrnn_lightning.models.s4d import S4D
from lrnn_lightning.models.s5 import S5
from lrnn_lightning.rollout.fused.fold import fold_norms

MODAL, S4D_ID, MAMBA, RGLRU_ID = 0, 1, 2, 3
MIXER_IDS: dict[type, int] = {LRU: MODAL, S5: MODAL, S4D: S4D_ID, Mamba: MAMBA, RGLRU: RGLRU_ID}
MIXER_NAMES = {MODAL: "LRU/S5", S4D_ID: "S4D", MAMBA: "Mamba", RGLRU_ID: "RG-LRU"}
RULES = {"dirac": 0, "zoh": 1, "bilinear": 2}
N_SLOTS = 9


@dataclass
class PackedModel:
    """What one launch of the fused kernel reads, plus the sizes that shape it.

    Attributes:
        common: encoder/decoder, norms and MLP tensors, by kernel argument name; for a one-layer LRU / S5
            model also "columns", some of them transposed (`transposed_columns`); packed with `fold`, for an
            LRU / S5 model on bf16 weights also the weights with their LayerNorm gains folded in (fold.py).
        mixer: the nine mixer slots m0..m8 (unused ones hold a 1-element dummy).
        sizes: md0..md3.
        mixer_id, rule, has_scale: the kernel's MIXER, RULE and HAS_SCALE constexprs.
        width, d_model, d_ff, n_layers, eps: W, D, F (MLP hidden), L and the LayerNorm epsilon.
        state_width: floats per batch row per layer in the kernel's state layout.
        scratch_width: floats per batch row of the mixer's scratch.
        blocks: block sizes per feature dim, filled in by the launcher.
    """

    common: dict[str, Tensor]
    mixer: list[Tensor]
    sizes: tuple[int, int, int, int]
    mixer_id: int
    rule: int
    has_scale: bool
    width: int
    d_model: int
    d_ff: int
    n_layers: int
    eps: float
    state_width: int
    scratch_width: int
    blocks: dict[str, int] = field(default_factory=dict)


def _stack(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """(L, ...) in `dtype`, contiguous. One layer's tensor that needs no cast or copy comes back as a view of
    itself (a live parameter, read by the kernel as it is): one kernel fewer in every call's packing."""
    if len(tensors) == 1:
        return tensors[0].detach().to(dtype).contiguous().unsqueeze(0)
    return torch.stack([t.detach() for t in tensors]).to(dtype).contiguous()


def _layer_planes(z: Tensor) -> Tensor:
    """Complex (L, ...) -> real (L, 2, ...): each layer's real then imaginary part, contiguous fp32."""
    return torch.stack([z.real, z.imag], dim=1).float()


def pack_model(model: SequenceModel, weight_dtype: torch.dtype, event: bool, fold: bool = False) -> PackedModel:
    """Everything the kernel reads, from the live parameters of `model` (assumed covered; see `fused_support`).

    Args:
        model: a covered SequenceModel.
        weight_dtype: torch.float32 or torch.bfloat16, the dtype of the tl.dot weights.
        event: whether the rollout has per-step timesteps (discretisation then happens in the kernel).
        fold: also the weights with their LayerNorm gains folded in (`fold.fold_norms`), for phased steps of an
            LRU / S5 model on bf16 weights (ignored elsewhere); about 0.1 ms of every call's packing on an H100
            at (1024, 512, 128, 8), so only the launches that read them ask.
    """
    f32 = torch.float32
    with torch.no_grad():
        layers = list(model.layers)
        mixers = [la.mixer for la in layers]
        mixer_id = MIXER_IDS[type(mixers[0])]
        folding = fold and mixer_id == MODAL and weight_dtype == torch.bfloat16
        # with folding, the up-projections' fp32 stack feeds both the packed matrices and their folded copies
        up_fp32 = _stack([la.mlp.up.weight for la in layers], f32) if folding else None
        common = {
            "enc_w": model.encoder.weight.detach().to(weight_dtype).contiguous(),
            "enc_b": model.encoder.bias.detach().float().contiguous(),
            "dec_w": model.decoder.weight.detach().to(weight_dtype).contiguous(),
            "dec_b": model.decoder.bias.detach().float().contiguous(),
            "final_g": model.final_norm.weight.detach().float().contiguous(),
            "final_b": model.final_norm.bias.detach().float().contiguous(),
            "norm1_g": _stack([la.mixer_norm.weight for la in layers], f32),
            "norm1_b": _stack([la.mixer_norm.bias for la in layers], f32),
            "norm2_g": _stack([la.mlp_norm.weight for la in layers], f32),
            "norm2_b": _stack([la.mlp_norm.bias for la in layers], f32),
            "up_w": (up_fp32.to(weight_dtype) if folding else
                     _stack([la.mlp.up.weight for la in layers], weight_dtype)),
            "up_b": _stack([la.mlp.up.bias for la in layers], f32),
            "down_w": _stack([la.mlp.down.weight for la in layers], weight_dtype),
            "down_b": _stack([la.mlp.down.bias for la in layers], f32),
        }
        packer = {MODAL: _pack_modal, S4D_ID: _pack_s4d, MAMBA: _pack_mamba, RGLRU_ID: _pack_rglru}[mixer_id]
        if mixer_id == MODAL:  # B's fp32 rows feed the packed B and its folded copy: computed once
            inputs = type(mixers[0]).stacked_input_weights(mixers).detach()
            packer = partial(_pack_modal, inputs=inputs)
        slots, sizes, rule, has_scale, state_width, scratch_width = packer(mixers, weight_dtype, event)
        if folding:
            common.update(fold_norms(model, inputs, up_fp32, common, weight_dtype))
        if mixer_id == MODAL and len(layers) == 1:
            common["columns"] = transposed_columns(common["enc_w"], slots[1], common["down_w"])
    device = common["enc_b"].device
    dummy = torch.empty(1, device=device, dtype=f32)  # the kernel never reads an unused slot: no fill needed
    slots = slots + [dummy] * (N_SLOTS - len(slots))
    return PackedModel(common=common, mixer=slots, sizes=tuple(sizes) + (0,) * (4 - len(sizes)), mixer_id=mixer_id,
                       rule=rule, has_scale=has_scale, width=model.d_input, d_model=model.d_model,
                       d_ff=layers[0].mlp.down.in_features, n_layers=len(layers), eps=float(model.final_norm.eps),
                       state_width=state_width, scratch_width=max(scratch_width, 1))


def transposed_columns(enc_w: torch.Tensor, readout: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """A one-layer modal model's encoder (D, W), readout (1, D, 2P) and MLP down-projection (1, D, F),
    transposed and stacked as rows of d_model: (W + 2P + F, D), d_model contiguous.

    `kernels/resident.resident_row_steps` reads them so, to hold every weight tile row-major.
    """
    return torch.cat([enc_w.t(), readout[0].t(), down_w[0].t()]).contiguous()


def _pack_modal(mixers: list, weight_dtype: torch.dtype, event: bool, inputs: Tensor):
    """LRU / S5 layers (one class and configuration, `support.model_coverage`), from their parameters stacked
    over layers: a few dozen ops whatever the depth (the mixers' `stacked_*` methods)."""
    first, kind = mixers[0], type(mixers[0])
    win = inputs.to(weight_dtype).contiguous()
    C = torch.stack([m.C.detach() for m in mixers])  # (L, 2, D, P)
    readout = torch.cat([C[:, 0], -C[:, 1]], dim=-1)
    if first.output_scale != 1.0:
        readout = first.output_scale * readout
    readout = readout.to(weight_dtype).contiguous()
    skip = _stack([m.D for m in mixers], torch.float32)
    rule = RULES["dirac"] if kind is LRU else RULES[first.discretization]
    if event:
        if kind is LRU:  # lambda^dt = exp(dt log lambda), input unscaled
            zeta = kind.stacked_log_lambda(mixers)
            lam, steps = torch.zeros_like(zeta), torch.zeros_like(zeta.real)
        else:
            steps, lam = kind.stacked_steps(mixers), kind.stacked_eigenvalues(mixers)
            zeta = steps * lam
        coef_a, coef_b = _layer_planes(zeta), _layer_planes(lam)
    else:
        log_decay, scale = kind.stacked_discretization(mixers)
        coef_a = _layer_planes(torch.exp(log_decay))
        coef_b = _layer_planes(scale if scale is not None else torch.ones_like(log_decay))
        steps = torch.zeros_like(log_decay.real)
    slots = [win, readout, skip, coef_a, coef_b, steps.float().contiguous()]
    return slots, (first.n_modes,), rule, rule != RULES["dirac"], 2 * first.n_modes, 2 * first.n_modes


def _pack_s4d(mixers: list, weight_dtype: torch.dtype, event: bool):
    """S4D layers of one size, from their parameters stacked over layers (`S4D.stacked_*`)."""
    first = mixers[0]
    if event:  # the kernel discretises dt * Delta * A
        lam = S4D.stacked_eigenvalues(mixers)
        coef_a, coef_b = _layer_planes(S4D.stacked_steps(mixers) * lam), _layer_planes(lam)
    else:
        log_decay, scale = S4D.stacked_discretization(mixers)
        coef_a, coef_b = _layer_planes(torch.exp(log_decay)), _layer_planes(scale)
    slots = [coef_a, coef_b, _stack([m.C for m in mixers], torch.float32), _stack([m.D for m in mixers], torch.float32)]
    return slots, (first.n_modes,), RULES["zoh"], True, 2 * first.d_model * first.n_modes, 0


def _pack_mamba(mixers: list, weight_dtype: torch.dtype, event: bool):
    f32 = torch.float32
    first = mixers[0]
    inner, n, rank, taps = first.d_inner, first.d_state, first.dt_rank, first.conv.kernel_size
    slots = [
        _stack([m.in_proj.weight for m in mixers], weight_dtype),
        _stack([m.conv.weight for m in mixers], f32),
        _stack([m.conv.bias for m in mixers], f32),
        _stack([m.x_proj.weight for m in mixers], weight_dtype),
        _stack([m.dt_proj.weight for m in mixers], weight_dtype),
        _stack([m.dt_proj.bias for m in mixers], f32),
        Mamba.stacked_continuous_A(mixers).float(),
        _stack([m.D for m in mixers], f32),
        _stack([m.out_proj.weight for m in mixers], weight_dtype),
    ]
    state_width = inner * (taps - 1) + inner * n
    scratch_width = 5 * inner + rank + 2 * n
    return slots, (inner, n, rank, taps), 0, False, state_width, scratch_width


def _pack_rglru(mixers: list, weight_dtype: torch.dtype, event: bool):
    f32 = torch.float32
    first = mixers[0]
    width, taps = first.width, first.conv.kernel_size
    slots = [
        _stack([m.in_proj.weight for m in mixers], weight_dtype),
        _stack([m.in_proj.bias for m in mixers], f32),
        _stack([m.conv.weight for m in mixers], f32),
        _stack([m.conv.bias for m in mixers], f32),
        _stack([m.gates.weight for m in mixers], weight_dtype),
        _stack([m.gates.bias for m in mixers], f32),
        RGLRU.stacked_log_decay_bases(mixers).float(),
        _stack([m.out_proj.weight for m in mixers], weight_dtype),
        _stack([m.out_proj.bias for m in mixers], f32),
    ]
    return slots, (width, taps), 0, False, width * (taps - 1) + width, 6 * width


STATE_KEYS = {MODAL: ("h_re", "h_im"), S4D_ID: ("h_re", "h_im"), MAMBA: ("conv", "h"), RGLRU_ID: ("conv", "h")}


def write_state_rows(mixer_id: int, state: dict[str, Tensor], rows: Tensor, batch: int) -> None:
    """Every layer's step-protocol state ("<layer>.<key>" entries, (batch, ...) each) into the first `batch` of the
    kernel's fp32 rows (L, >= batch, state_width), in place, in the kernel's layout: per row, each key's values
    flattened, in STATE_KEYS order. Each key's part of all layers is one stacked copy: two ops a key, whatever the
    depth. Raises a ValueError, before writing anything, for a state of another batch size or layout."""
    hint = "HINT: the state of this model's prefill or allocate_state, at x0's batch size."
    parts = []
    for key in STATE_KEYS[mixer_id]:
        names = [f"{layer}.{key}" for layer in range(rows.shape[0])]
        missing = [name for name in names if name not in state]
        if missing:
            raise ValueError(f"fused_steps: the state has no entries {missing[:4]}; its keys are {sorted(state)[:6]}. "
                             "HINT: make it with the model's allocate_state or prefill.")
        for name in names:
            shape = tuple(state[name].shape)
            if not shape or shape[0] != batch or shape != tuple(state[names[0]].shape):
                raise ValueError(f"fused_steps: state '{name}' has shape {shape}, but x0 has {batch} rows and "
                                 f"'{names[0]}' has shape {tuple(state[names[0]].shape)}. {hint}")
        parts.append(torch.stack([state[name].flatten(1) for name in names]))
    width = sum(part.shape[-1] for part in parts)
    if width != rows.shape[-1]:
        raise ValueError(f"fused_steps: the state holds {width} values a row per layer, but the model's state holds "
                         f"{rows.shape[-1]} ({' + '.join(STATE_KEYS[mixer_id])}). {hint}")
    start = 0
    for part in parts:
        rows[:, :batch, start:start + part.shape[-1]] = part
        start += part.shape[-1]


def rows_to_state(mixer_id: int, rows: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """One layer's (B, state_width) rows (`write_state_rows`' layout) -> a state shaped like `like` (any batch size)
    with B rows."""
    out, start = {}, 0
    for key in STATE_KEYS[mixer_id]:
        template = like[key]
        size = template[0].numel()
        out[key] = rows[:, start:start + size].reshape(rows.shape[0], *template.shape[1:]).to(template.dtype)
        start += size
    return out
