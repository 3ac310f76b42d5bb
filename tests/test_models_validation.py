"""The shared input checks: dt values checked once per top-level call, one positive-int check,
and the LTI event paths on the O(L) pairwise scan."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import torch

import lrnn_lightning.models as models_package
from lrnn_lightning.models import MIXERS, SequenceModel, get_mixer_class, lti_modal, s4d, validation
from lrnn_lightning.models.causal_conv import CausalConv1d
from lrnn_lightning.models.lru import LRU
from lrnn_lightning.models.mamba import Mamba
from lrnn_lightning.models.rglru import RGLRU
from lrnn_lightning.models.s4d import S4D
from lrnn_lightning.models.s5 import S5
from lrnn_lightning.models.scan import linear_scan
from lrnn_lightning.models.validation import check_dt, check_positive_int, dt_values_checked
from tests.conftest import relative_error
from tests.helpers import perturb_parameters, random_dt

BATCH, LENGTH, D_MODEL = 2, 11, 8


@pytest.fixture
def value_checks(monkeypatch):
    """The owners named by every call of `check_dt_values`, in order."""
    owners = []
    original = validation.check_dt_values

    def counting(dt, owner):
        owners.append(owner)
        return original(dt, owner)

    monkeypatch.setattr(validation, "check_dt_values", counting)
    return owners


@pytest.mark.parametrize("name", list(MIXERS))
def test_sequence_model_checks_dt_values_once_per_call(name, value_checks):
    model = SequenceModel(name, d_input=3, d_output=3, d_model=D_MODEL, d_state=4, n_layers=3).eval()
    x, dt = torch.randn(BATCH, LENGTH, 3), torch.ones(BATCH, LENGTH)
    with torch.no_grad():
        model(x, dt)
        assert value_checks == ["SequenceModel"]
        model.prefill(x, dt)
        assert value_checks == ["SequenceModel"] * 2
        model(x)  # no dt: nothing to check
    assert value_checks == ["SequenceModel"] * 2


@pytest.mark.parametrize("name", list(MIXERS))
def test_a_standalone_mixer_still_checks_dt_values(name, value_checks):
    mixer = get_mixer_class(name)(D_MODEL, 4)
    model = SequenceModel(name, d_input=3, d_output=3, d_model=D_MODEL, d_state=4, n_layers=2)
    negative = torch.ones(BATCH, LENGTH).index_fill_(1, torch.tensor([3]), -0.5)
    with torch.no_grad():
        model(torch.randn(BATCH, LENGTH, 3), torch.ones(BATCH, LENGTH))  # leaves nothing marked as checked
        with pytest.raises(ValueError, match=rf"{type(mixer).__name__}: dt must be strictly positive, got -0\.5"):
            mixer(torch.randn(BATCH, LENGTH, D_MODEL), negative)
        with pytest.raises(ValueError, match=r"dt must be strictly positive, got -0\.5"):
            mixer.prefill(torch.randn(BATCH, LENGTH, D_MODEL), negative)
        with pytest.raises(ValueError, match=r"SequenceModel: dt must be strictly positive, got -0\.5"):
            model(torch.randn(BATCH, LENGTH, 3), negative)
    assert value_checks.count("SequenceModel") == 2


def test_dt_values_checked_skips_only_that_tensor_and_only_inside_the_block(value_checks):
    checked, other = torch.ones(BATCH, LENGTH), torch.full((BATCH, LENGTH), -1.0)
    with dt_values_checked(checked):
        check_dt(checked, BATCH, LENGTH, "inner")
        with pytest.raises(ValueError, match=r"inner: dt must be strictly positive, got -1"):
            check_dt(other, BATCH, LENGTH, "inner")
        with pytest.raises(ValueError, match=r"expected dt of shape \(B, L\) = \(2, 12\)"):
            check_dt(checked, BATCH, LENGTH + 1, "inner")  # shapes are still checked
    check_dt(checked, BATCH, LENGTH, "outer")
    assert value_checks == ["inner", "outer"]


# ---------------------------------------------------------------- positive integers


def test_one_positive_int_check_serves_the_whole_package():
    folder = pathlib.Path(models_package.__file__).parent.parent
    # the tell of a hand-written positive-int check: bools excluded and "< 1" on one line
    bool_excluded = re.compile(r"isinstance\(\w+, bool\).*< 1\b")
    owners = [str(path.relative_to(folder)) for path in sorted(folder.rglob("*.py"))
              if bool_excluded.search(path.read_text())]
    assert owners == ["models/validation.py"]
    assert check_positive_int(3, "n", "Owner") == 3 and check_positive_int(np.int64(3), "n", "Owner") == 3
    for bad in (0, -2, 2.0, True, "4", None, np.float32(1)):
        with pytest.raises(ValueError, match=rf"Owner: n must be a positive integer, got {re.escape(repr(bad))}\.$"):
            check_positive_int(bad, "n", "Owner")
    with pytest.raises(ValueError, match=r'Owner: n must be a positive integer or "auto", got 0\. HINT: try 8\.$'):
        check_positive_int(0, "n", "Owner", '"auto"', hint="try 8.")


@pytest.mark.parametrize("build,message", [
    (lambda: SequenceModel("lru", d_input=0, d_output=3), r"SequenceModel: d_input must be a positive integer, got 0"),
    (lambda: SequenceModel("lru", 3, 3, n_layers=2.5), r"SequenceModel: n_layers must be a positive integer, got 2\.5"),
    (lambda: CausalConv1d(4, True), r"CausalConv1d: kernel_size must be a positive integer, got True"),
    (lambda: Mamba(8, 4, d_conv=-1), r"Mamba: d_conv must be a positive integer, got -1"),
    (lambda: Mamba(8, 4, dt_rank="full"), r'Mamba: dt_rank must be a positive integer or "auto".*got \'full\''),
    (lambda: RGLRU(8, 1, expand=0), r"RGLRU: expand must be a positive integer, got 0"),
    (lambda: LRU(8, "16"), r"LRU: d_state must be a positive integer, got '16'"),
    (lambda: S4D(0, 8), r"S4D: d_model must be a positive integer, got 0"),
    (lambda: S5(8, None), r"S5: d_state must be a positive integer, got None"),
], ids=["backbone-d_input", "backbone-n_layers", "conv", "mamba", "mamba-dt_rank", "rglru", "lru", "s4d", "s5"])
def test_every_owner_names_its_bad_positive_int(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ---------------------------------------------------------------- LTI event paths use the pairwise scan


@pytest.mark.parametrize("cls,module", [(LRU, lti_modal), (S5, lti_modal), (S4D, s4d)], ids=["lru", "s5", "s4d"])
def test_lti_event_path_uses_the_pairwise_scan_and_its_gradients(cls, module, monkeypatch):
    torch.manual_seed(0)
    mixer = cls(D_MODEL, 8)
    perturb_parameters(mixer)
    x, dt = torch.randn(BATCH, 37, D_MODEL), random_dt(BATCH, 37)
    calls = []
    pairwise = module.pairwise_scan

    def spy(*args):
        calls.append(args[0].shape)
        return pairwise(*args)

    gradients = []
    for scan in (spy, linear_scan):  # the O(L log L) scan as the reference
        monkeypatch.setattr(module, "pairwise_scan", scan)
        mixer.zero_grad()
        y = mixer(x, dt)
        y.square().mean().backward()
        gradients.append((y.detach(), {name: p.grad.clone() for name, p in mixer.named_parameters()}))
    assert len(calls) == 1
    (y, grads), (y_ref, grads_ref) = gradients
    assert relative_error(y, y_ref) < 1e-5
    for name, grad in grads.items():
        assert grad.abs().sum() > 0 and relative_error(grad, grads_ref[name]) < 1e-4, name
