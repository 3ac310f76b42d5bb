"""Kernels per recurrent `step`: inside a CUDA graph each one costs ~2 us, so the counts are pinned.

`count_kernels` counts the aten operators that do work (views, aliases, bare allocations and
host-side queries such as promote_types excluded) as they reach the dispatcher, which on a
GPU is about one kernel launch each. The bounds below are the counts after the step bodies
were fused; a change that adds kernels to a step fails here and must raise the bound on purpose.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lrnn_lightning.models import SequenceModel, get_mixer_class
from lrnn_lightning.models.causal_conv import CausalConv1d
from tests.helpers import perturb_parameters, random_dt

# ops that only allocate or relabel memory: no kernel runs for them
_NO_KERNEL = {"aten::_unsafe_view", "aten::empty", "aten::empty_strided", "aten::empty_like"}


class KernelCounter(TorchDispatchMode):
    """Counts the non-view aten operators dispatched while active, by name, in `ops`."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        returns_tensor = any(isinstance(r.type, torch.TensorType) for r in func._schema.returns)
        if returns_tensor and not func.is_view and name not in _NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def count_kernels():
    """`with count_kernels() as counter: ...` then read `counter.total` or `counter.ops`."""
    with torch.no_grad(), KernelCounter() as counter:
        yield counter


def kernels_per_step(module, batch: int, width: int, event: bool) -> KernelCounter:
    """The operators of one `module.step` call on random input from a nonzero state."""
    state = module.allocate_state(batch, "cpu", torch.float32)
    x = torch.randn(3, batch, width)
    dt = random_dt(batch, 3)
    with torch.no_grad():
        for t in range(2):  # warm-up: a nonzero state, and any lazy initialisation done
            module.step(x[t], state, dt[:, t] if event else None)
    with count_kernels() as counter:
        module.step(x[2], state, dt[:, 2] if event else None)
    return counter


D_MODEL, D_STATE, BATCH = 16, 8, 3

# kernels per step (no dt, event dt) on the CPU dispatcher; before the fused step bodies:
# lru 17/18, s4d 21/22, s5 22/23, mamba 24/24, rglru 23/24; 4 layers: 103/107, 119/123, 123/127,
# 131/131, 127/131
MIXER_BOUNDS = {
    "lru": (17, 18),
    "s4d": (21, 22),
    "s5": (22, 23),
    "mamba": (20, 20),
    "rglru": (20, 21),
}
MODEL_LAYERS = 4
MODEL_BOUNDS = {
    "lru": (103, 107),
    "s4d": (119, 123),
    "s5": (123, 127),
    "mamba": (115, 115),
    "rglru": (115, 119),
}


def _mixer(name):
    torch.manual_seed(0)
    mixer = get_mixer_class(name)(D_MODEL, D_STATE)
    perturb_parameters(mixer)
    return mixer.eval()


def _model(name):
    torch.manual_seed(0)
    model = SequenceModel(name, d_input=5, d_output=5, d_model=D_MODEL, d_state=D_STATE, n_layers=MODEL_LAYERS)
    perturb_parameters(model)
    return model.eval()


def test_counter_sees_kernels_and_skips_views():
    x = torch.randn(4, 6)
    with count_kernels() as counter:
        y = x.t().unsqueeze(0).reshape(6, 4)  # views only
        torch.addmm(y[:, :1], y, x)             # one kernel
    assert counter.total == 1 and counter.ops["aten::addmm"] == 1


@pytest.mark.parametrize("name", list(MIXER_BOUNDS))
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_mixer_step_kernel_count(name, event):
    counter = kernels_per_step(_mixer(name), BATCH, D_MODEL, event)
    assert counter.total <= MIXER_BOUNDS[name][event], dict(counter.ops)


@pytest.mark.parametrize("name", list(MODEL_BOUNDS))
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_sequence_model_step_kernel_count(name, event):
    counter = kernels_per_step(_model(name), BATCH, 5, event)
    assert counter.total <= MODEL_BOUNDS[name][event], dict(counter.ops)


@pytest.mark.parametrize("kernel_size", [2, 4])
def test_causal_conv_step_is_one_convolution_and_a_window_roll(kernel_size):
    conv = CausalConv1d(5, kernel_size)
    window = conv.allocate_window(BATCH)
    x_t = torch.randn(BATCH, 5)
    with count_kernels() as counter:
        conv.step(x_t, window)
    assert counter.ops["aten::convolution"] == 1
    assert counter.total <= 3, dict(counter.ops)  # taps = [window, x_t]; conv; window <- taps[1:]
