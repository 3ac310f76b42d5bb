"""The LayerNorm folding of the phased kernel's bf16 products (lrnn_lightning/rollout/fused/fold.py).

The identity the kernel relies on, checked in fp32 on random nonzero weights and on rows whose mean
is large against their spread, centred as the kernel centres them, and what `pack_model` packs for
it (only LRU / S5 on bf16 weights, from the live parameters). The kernel's use of it runs in
test_fused_phased.py (interpreter) and test_fused_phased_cuda.py (GPU).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from lrnn_lightning.rollout.fused.fold import FOLDED_KEYS, folded
from lrnn_lightning.rollout.fused.launch import weight_bytes
from lrnn_lightning.rollout.fused.pack import pack_model
from tests.conftest import relative_error
from tests.test_fused import make_model

FOLD_KEYS = set(FOLDED_KEYS)


def layer_norm_inputs(seed: int = 0, layers: int = 2, n: int = 12, k: int = 40, rows: int = 5):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(layers, n, k, generator=generator)
    gains = 1 + 0.3 * torch.randn(layers, k, generator=generator)
    biases = 0.2 * torch.randn(layers, k, generator=generator)
    h = 6.0 + torch.randn(rows, k, generator=generator)  # rows whose mean is large against their spread
    return weights, gains, biases, h


def test_folded_weights_on_a_centred_copy_give_the_normalised_product():
    weights, gains, biases, h = layer_norm_inputs()
    w_folded, sums, shifts = folded(weights, gains, biases, torch.float32)
    assert w_folded.shape == (2, 12, 40) and sums.shape == shifts.shape == (2, 12)
    assert torch.allclose(sums, w_folded.sum(-1))
    mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    rstd = 1 / torch.sqrt(var + 1e-5)
    centre = h[:, :16].mean(-1, keepdim=True)  # the encoder's centre: its first column tile's mean
    for layer in range(2):
        ref = F.layer_norm(h, (40,), gains[layer], biases[layer], eps=1e-5) @ weights[layer].T
        out = rstd * ((h - centre) @ w_folded[layer].T - (mean - centre) * sums[layer]) + shifts[layer]
        assert relative_error(out, ref) < 1e-5


def test_bf16_folded_weights_sum_as_stored():
    weights, gains, biases, _ = layer_norm_inputs(seed=1)
    w_folded, sums, _ = folded(weights, gains, biases, torch.bfloat16)
    assert w_folded.dtype == torch.bfloat16 and sums.dtype == torch.float32
    # the sums of the rounded weights the product multiplies, so that the mean cancels against them
    assert torch.allclose(sums, w_folded.double().sum(-1).float())
    exact = weights * gains[:, None, :]
    assert 0 < relative_error(w_folded.float(), exact) < 2 ** -8


def test_pack_folds_the_norms_of_modal_models_on_bf16_weights_only_when_asked():
    lru = make_model("lru", d_model=16, d_state=8)
    assert not FOLD_KEYS & pack_model(lru, torch.bfloat16, event=False).common.keys()
    packed = pack_model(lru, torch.bfloat16, event=False, fold=True)
    assert FOLD_KEYS <= packed.common.keys()
    assert packed.common["win_w_folded"].shape == (2, 16, 16) and packed.common["up_w_folded"].dtype == torch.bfloat16
    assert not FOLD_KEYS & pack_model(lru, torch.float32, event=False, fold=True).common.keys()
    # a step reads either the folded or the unfolded matrices: the bytes that shape launches count one set
    unfolded = {key: value for key, value in packed.common.items() if key not in FOLD_KEYS}
    assert weight_bytes(packed) == weight_bytes(replace(packed, common=unfolded))
    assert not FOLD_KEYS & pack_model(make_model("mamba", d_model=16, d_state=8), torch.bfloat16, event=False,
                                      fold=True).common.keys()
    # packed from the live parameters: a changed norm gain is seen at the next packing
    with torch.no_grad():
        lru.layers[1].mlp_norm.weight.mul_(2.0)
    again = pack_model(lru, torch.bfloat16, event=False, fold=True).common
    assert torch.equal(again["up_w_folded"][0], packed.common["up_w_folded"][0])
    assert torch.equal(again["up_w_folded"][1], 2 * packed.common["up_w_folded"][1])  # bf16 scales by 2 exactly
