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


def folded(w: Tensor, g: Tensor, b: Tensor, weight_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per layer l, W_l (N, K) after a LayerNorm of gain g_l (K,) and bias b_l (K,): w (L, N, K), g and b (L, K),
    fp32 -> (W' (L, N, K) in weight_dtype, its sums over K as stored (L, N) fp32, W b (L, N) fp32)."""
    shifts = torch.bmm(w, b[:, :, None])[:, :, 0]
    # the product in fp32, rounded once as it is stored: one pass over w instead of a product and a cast
    w_folded = torch.mul(w, g[:, None, :], out=torch.empty(w.shape, dtype=weight_dtype, device=w.device))
    return w_folded, w_folded.sum(-1, dtype=torch.float32), shifts


def fold_norms(model: SequenceModel, mixer_inputs: Tensor, up_weights: Tensor, common: dict[str, Tensor],
               weight_dtype: torch.dtype) -> dict[str, Tensor]:
    """The folded decoder, mixer input and MLP up-projection of a modal (LRU / S5) model.

    Args:
        model: the SequenceModel being packed.
        mixer_inputs: the layers' mixer input weights B as [Re; Im] rows, (L, 2P, D) fp32.
        up_weights: the layers' MLP up-projections, (L, 2F, D) fp32.
        common: the packing's stacked LayerNorm gains and biases ("final_g", "final_b" (D,), "norm1_g", "norm1_b",
            "norm2_g", "norm2_b" (L, D), fp32), read from there rather than stacked again.
        weight_dtype: the dtype of the folded weights (the kernel's weight dtype).

    Returns, for name in dec, win and up: "{name}_w_folded" (L, N, D) (dec: L = 1, N = W; win: N = 2P; up: N = 2F),
    "{name}_sums" (L, N) and "{name}_b_folded" (L, N): the layer's own bias (none for win) plus W b.
    """
    dec_w, dec_sums, dec_shift = folded(model.decoder.weight.detach().float()[None], common["final_g"][None],
                                        common["final_b"][None], weight_dtype)
    win, win_sums, win_shifts = folded(mixer_inputs, common["norm1_g"], common["norm1_b"], weight_dtype)
    up, up_sums, up_shift = folded(up_weights, common["norm2_g"], common["norm2_b"], weight_dtype)
    return {"dec_w_folded": dec_w, "dec_sums": dec_sums,
            "dec_b_folded": dec_shift + common["dec_b"][None, :],
            "win_w_folded": win, "win_sums": win_sums, "win_b_folded": win_shifts,
            "up_w_folded": up, "up_sums": up_sums, "up_b_folded": up_shift + common["up_b"]}
