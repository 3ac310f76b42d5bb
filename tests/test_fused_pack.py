"""`pack_model` on LRU / S5 models: the mixers' coefficients come from their parameters stacked over layers
(the models' `stacked_*` methods), so the packing is a fixed few dozen ops whatever the depth, each one a node
of every fused call's CUDA graph. Checked against each layer's own methods, bit for bit, on random nonzero
parameters. And the state's layout in the kernel's rows (`write_state_rows`, `rows_to_state`)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lrnn_lightning.models.lti_complex import upcast
from lrnn_lightning.rollout.fused.pack import MIXER_IDS, STATE_KEYS, pack_model, rows_to_state, write_state_rows
from tests.test_fused import make_model

MODAL_CASES = [("lru", {}), ("s5", {"discretization": "zoh"}), ("s5", {"discretization": "bilinear"}),
               ("s5", {"discretization": "dirac"}), ("s5", {"conj_sym": False})]


def planes(z: torch.Tensor) -> torch.Tensor:
    return torch.stack([z.real, z.imag]).float()


def per_layer_slots(model, weight_dtype, event):
    """The mixer slots m0..m5, each layer from its own methods or, in event mode, the packing's per-layer formulas
    before stacking (with the models' upcast, as their `_discretize` reads the parameters)."""
    mixers = [layer.mixer for layer in model.layers]
    win = torch.stack([m._input_weight() for m in mixers]).to(weight_dtype)
    readout = torch.stack([m.output_scale * torch.cat([m.C[0], -m.C[1]], dim=1) for m in mixers]).to(weight_dtype)
    coef_a, coef_b, steps = [], [], []
    for m in mixers:
        if event and hasattr(m, "nu_log"):  # LRU: exp(dt log lambda), input unscaled
            log_lambda = m._log_lambda()
            a, b, step = log_lambda, torch.zeros_like(log_lambda), torch.zeros_like(m.nu_log)
        elif event:  # S5: the kernel discretises dt * Delta * Lambda
            step, b = upcast(m.log_step).exp(), m.eigenvalues()
            a = step * b
        else:
            log_decay, scale = m._discretize(None)
            a, b, step = log_decay.exp(), torch.ones_like(log_decay) if scale is None else scale, \
                torch.zeros_like(log_decay.real)
        coef_a.append(planes(a))
        coef_b.append(planes(b))
        steps.append(step.float())
    return [win, readout, torch.stack([m.D for m in mixers]).float(), torch.stack(coef_a), torch.stack(coef_b),
            torch.stack(steps)]


@pytest.mark.parametrize("name,kwargs", MODAL_CASES, ids=lambda case: str(case))
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("event", [False, True], ids=["unit", "event"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32-params", "bf16-params"])
def test_stacked_packing_is_each_layers_own(name, kwargs, n_layers, event, param_dtype):
    model = make_model(name, kwargs, d_model=12, d_state=8, n_layers=n_layers).to(param_dtype)
    for weight_dtype in (torch.float32, torch.bfloat16):
        packed = pack_model(model, weight_dtype, event=event, fold=True)
        unfolded = pack_model(model, weight_dtype, event=event)
        for key, value in unfolded.common.items():  # what other launches read is the same with the folded copies
            assert torch.equal(packed.common[key], value), key
        expected = per_layer_slots(model, weight_dtype, event)
        with torch.no_grad():
            for index, want in enumerate(expected):
                got = packed.mixer[index]
                assert got.dtype == want.dtype and got.shape == want.shape, index
                assert torch.equal(got, want), f"slot m{index}"
        assert packed.mixer[3].abs().max() > 0 and packed.mixer[1].abs().max() > 0


class _CountOps(TorchDispatchMode):
    """Counts the ATen ops that compute (views are free in a graph)."""

    VIEWS = {"view", "unsqueeze", "select", "slice", "t", "real", "imag", "detach", "_unsafe_view", "expand", "alias",
             "view_as_real", "transpose", "permute", "squeeze", "as_strided"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def packing_ops(model, event: bool) -> collections.Counter:
    with _CountOps() as counter:
        pack_model(model, torch.bfloat16, event=event, fold=True)
    return counter.ops


@pytest.mark.parametrize("name,kwargs", [("lru", {}), ("s5", {"discretization": "zoh"}), ("s4d", {}), ("mamba", {}),
                                         ("rglru", {})], ids=["lru", "s5", "s4d", "mamba", "rglru"])
@pytest.mark.parametrize("event", [False, True], ids=["unit", "event"])
def test_packing_takes_as_many_ops_at_eight_layers_as_at_two(name, kwargs, event):
    shallow = packing_ops(make_model(name, kwargs, d_model=12, d_state=8, n_layers=2), event)
    deep = packing_ops(make_model(name, kwargs, d_model=12, d_state=8, n_layers=8), event)
    assert deep == shallow
    assert sum(deep.values()) <= 60, deep  # LRU / S5: 101-181 before the coefficients were stacked (8 layers)


@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("event", [False, True], ids=["unit", "event"])
def test_stacked_s4d_mamba_and_rglru_coefficients_are_each_layers_own(n_layers, event):
    s4d = make_model("s4d", d_model=12, d_state=8, n_layers=n_layers)
    packed = pack_model(s4d, torch.float32, event=event)
    for layer, m in enumerate(layer.mixer for layer in s4d.layers):
        if event:
            lam = m.eigenvalues()
            a, b = m.log_dt.exp().unsqueeze(-1) * lam, lam
        else:
            log_decay, b = m._discretize(None)
            a = log_decay.exp()
        with torch.no_grad():
            assert torch.equal(packed.mixer[0][layer], planes(a)) and torch.equal(packed.mixer[1][layer], planes(b))
    mamba = make_model("mamba", d_model=12, d_state=8, n_layers=n_layers)
    with torch.no_grad():
        expected = torch.stack([layer.mixer._continuous_A() for layer in mamba.layers])
        assert torch.equal(pack_model(mamba, torch.float32, event=event).mixer[6], expected)
    rglru = make_model("rglru", d_model=12, d_state=8, n_layers=n_layers)
    with torch.no_grad():
        rglru.layers[0].mixer.c = 4.0  # layers of different c take each layer's own
        for model in (rglru, make_model("rglru", d_model=12, d_state=8, n_layers=n_layers)):
            expected = torch.stack([layer.mixer._log_decay_base() for layer in model.layers])
            assert torch.equal(pack_model(model, torch.float32, event=event).mixer[6], expected)


def test_event_packing_of_bf16_parameters_discretises_in_fp32_as_the_model_does():
    """bf16 parameters: Delta = exp(log_step) in fp32, as S5._discretize and S4D._discretize take it (the packing
    took exp in bf16 until the fourteenth session)."""
    s5 = make_model("s5", {"discretization": "zoh"}, d_model=12, d_state=8, n_layers=2).to(torch.bfloat16)
    packed = pack_model(s5, torch.bfloat16, event=True)
    with torch.no_grad():
        steps = torch.stack([layer.mixer.log_step.float().exp() for layer in s5.layers])
        assert torch.equal(packed.mixer[5], steps)
        rounded = torch.stack([layer.mixer.log_step.exp().float() for layer in s5.layers])  # exp in bf16
        assert not torch.equal(packed.mixer[5], rounded)
    s4d = make_model("s4d", d_model=12, d_state=8, n_layers=2).to(torch.bfloat16)
    with torch.no_grad():
        lam = torch.stack([layer.mixer.eigenvalues() for layer in s4d.layers])
        delta = torch.stack([layer.mixer.log_dt.float().exp() for layer in s4d.layers]).unsqueeze(-1)
        assert torch.equal(pack_model(s4d, torch.float32, event=True).mixer[0], torch.stack([(delta * lam).real,
                                                                                            (delta * lam).imag], 1))


@pytest.mark.parametrize("name", ["lru", "s4d", "mamba", "rglru"])
def test_state_rows_hold_every_layers_state_in_the_kernels_layout(name):
    model = make_model(name, d_model=12, d_state=8, n_layers=3)
    batch = 4
    state = {key: torch.randn_like(value) for key, value in model.allocate_state(batch).items()}
    mixer_id = MIXER_IDS[type(model.layers[0].mixer)]
    width = sum(state[f"0.{key}"][0].numel() for key in STATE_KEYS[mixer_id])
    rows = torch.full((3, batch + 2, width), 7.0)  # two padding rows, left as they were
    write_state_rows(mixer_id, state, rows, batch)
    assert torch.equal(rows[:, batch:], torch.full_like(rows[:, batch:], 7.0))
    for layer in range(3):
        like = {key: state[f"{layer}.{key}"] for key in STATE_KEYS[mixer_id]}
        expected = torch.cat([like[key].flatten(1) for key in STATE_KEYS[mixer_id]], dim=1)
        assert torch.equal(rows[layer, :batch], expected)
        back = rows_to_state(mixer_id, rows[layer, :batch], like)
        assert all(torch.equal(back[key], like[key]) for key in like)
    written = rows.clone()
    with pytest.raises(ValueError, match=r"state '0\.\w+' has shape \(4, .*but x0 has 3 rows.*HINT"):
        write_state_rows(mixer_id, state, rows, 3)
    other = make_model(name, d_model=16, d_state=4, n_layers=3).allocate_state(batch)  # another state size
    with pytest.raises(ValueError, match=rf"the state holds \d+ values a row per layer, but the model's state holds "
                                         rf"{width} .*HINT"):
        write_state_rows(mixer_id, other, rows, batch)
    resized = next(key for key in STATE_KEYS[mixer_id] if other[f"1.{key}"].shape != state[f"1.{key}"].shape)
    with pytest.raises(ValueError, match=rf"state '1\.{resized}' has shape .* and '0\.{resized}' has shape"):
        write_state_rows(mixer_id, dict(state, **{f"1.{resized}": other[f"1.{resized}"]}), rows, batch)
    assert torch.equal(rows, written)  # nothing written before raising
    del state["2.h" if "2.h" in state else "2.h_im"]
    with pytest.raises(ValueError, match=r"the state has no entries \['2\.h(_im)?'\].*HINT: make it with"):
        write_state_rows(mixer_id, state, rows, batch)
