"""LayerNorm gains folded into the weights after them: what the phased kernel's bf16 products read.

A LayerNorm followed by a product equals, with LN(h) = (h - mean) rstd g + b and W' = W diag(g),

    LN(h) W^T = rstd (h - mean) W'^T + W b

so a tile of the phased kernel (kernels/phased.py) on bf16 weights multiplies a bf16 copy of the
residual stream with W' and applies each row's (mean, rstd) once after the product, instead of
normalising every chunk before it: both operands then go from shared memory straight to the
tensor cores, and the product reads half the bytes of fp32 h. The copy holds h - c for a centre c
of each row, a recent mean of it: the encoder's first column tile's, then each layer's LN1 mean
(phase Y sets it, the MLP's down-projection keeps it). So its bf16 rounding errs by 2^-9 |h - c|, about
what rounding LN(h) would, even where a row's mean is large against its spread (rounding h itself
erred 14x more at a mean of 10 in tests/test_fused_phased.py). The product then subtracts
(mean - c) s, with s[n] = sum_k W'[n, k] over the bf16-rounded W', the very weights it multiplies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lrnn_lightning.models.backbone import SequenceModel

FOLDED_KEYS = tuple(f"{name}_{part}" for name in ("dec", "win", "up") for part in ("w_folded", "sums", "b_folded"))


def folded(weights: list[Tensor], gains: list[Tensor], biases: list[Tensor], weight_dtype: torch.dtype
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Per layer l, W_l (N, K) after a LayerNorm of gain g_l (K,) and bias b_l (K,) -> (W' (L, N, K) in
    weight_dtype, its sums over K as stored (L, N) fp32, W b (L, N) fp32)."""
    w = torch.stack([t.detach().float() for t in weights])
    g = torch.stack([t.detach().float() for t in gains])
    b = torch.stack([t.detach().float() for t in biases])
    shifts = torch.bmm(w, b[:, :, None])[:, :, 0]
    w_folded = w.mul_(g[:, None, :]).to(weight_dtype)  # w is a fresh stack: scaled in place, one pass fewer
    return w_folded, w_folded.sum(-1, dtype=torch.float32), shifts


def fold_norms(model: SequenceModel, mixer_inputs: list[Tensor], weight_dtype: torch.dtype) -> dict[str, Tensor]:
    """The folded decoder, mixer input and MLP up-projection of a modal (LRU / S5) model.

    Args:
        model: the SequenceModel being packed.
        mixer_inputs: each layer's mixer input weight B as [Re; Im] rows (2P, D), fp32.
        weight_dtype: the dtype of the folded weights (the kernel's weight dtype).

    Returns, for name in dec, win and up: "{name}_w_folded" (L, N, D) (dec: L = 1, N = W; win: N = 2P; up: N = 2F),
    "{name}_sums" (L, N) and "{name}_b_folded" (L, N): the layer's own bias (none for win) plus W b.
    """
    layers = list(model.layers)
    norm = model.final_norm
    dec_w, dec_sums, dec_shift = folded([model.decoder.weight], [norm.weight], [norm.bias], weight_dtype)
    win, win_sums, win_shifts = folded(mixer_inputs, [la.mixer_norm.weight for la in layers],
                                       [la.mixer_norm.bias for la in layers], weight_dtype)
    up, up_sums, up_shift = folded([la.mlp.up.weight for la in layers], [la.mlp_norm.weight for la in layers],
                                   [la.mlp_norm.bias for la in layers], weight_dtype)
    up_bias = torch.stack([la.mlp.up.bias.detach().float() for la in layers])
    return {"dec_w_folded": dec_w, "dec_sums": dec_sums,
            "dec_b_folded": dec_shift + model.decoder.bias.detach().float()[None, :],
            "win_w_folded": win, "win_sums": win_sums, "win_b_folded": win_shifts,
            "up_w_folded": up, "up_sums": up_sums, "up_b_folded": up_shift + up_bias}

