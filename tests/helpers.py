"""Test utilities: random weights, random timesteps, a guard against host syncs, Triton's interpreter."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
import torch


def perturb_parameters(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Add small Gaussian noise to every parameter, so zero-initialised ones (biases,
    skip terms) are exercised too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))


def random_dt(batch: int, length: int, low: float = 0.3, high: float = 2.0, device=None) -> torch.Tensor:
    """Positive timesteps that vary per row and per step."""
    return low + (high - low) * torch.rand(batch, length, device=device)


@contextlib.contextmanager
def forbid_host_sync():
    """Make every tensor -> Python conversion raise while active.

    A `step` that calls `.item()`, branches on a tensor's truth value, converts to a
    list or NumPy array, or uses a data-dependent shape op cannot be captured in a CUDA
    graph; on the CPU this guard catches the same mistakes.
    """
    names = ["item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"]
    originals = {name: getattr(torch.Tensor, name) for name in names}
    fn_names = ["nonzero", "masked_select", "unique", "where"]
    fn_originals = {name: getattr(torch, name) for name in fn_names}

    def refuse(name):
        def raiser(*args, **kwargs):
            if name == "where" and len(args) + len(kwargs) > 1:
                return fn_originals["where"](*args, **kwargs)  # 3-argument where is fine
            raise AssertionError(f"host synchronisation in step: Tensor.{name}")
        return raiser

    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        for name in fn_names:
            setattr(torch, name, refuse(name))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in fn_originals.items():
            setattr(torch, name, fn)


def has_module(name: str) -> bool:
    """Whether `name` (possibly dotted) can be imported; False also when a parent package is missing."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def subprocess_pythonpath(root) -> str:
    """PYTHONPATH for a subprocess: the checkout first, then whatever this process was given."""
    import os

    return os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))


def import_interpreted(module_name: str):
    """Import a module of Triton kernels under the Triton interpreter (TRITON_INTERPRET=1 while it is
    defined), for CPU tests; skips where Triton is missing, a GPU is present, or the module was already
    imported compiled in this process."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the compiled kernels are tested by the cuda-marked tests")
    module = sys.modules.get(module_name)
    if module is None:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            module = importlib.import_module(module_name)
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
    if not module.INTERPRETED:
        pytest.skip(f"{module_name} was already imported compiled in this process")
    return module


def count_calls(monkeypatch, owner, name: str) -> list[dict]:
    """Wrap `owner.name` so that every call appends its keyword arguments to the returned list."""
    calls = []
    original = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def record_callback_engines(monkeypatch, base=None) -> list:
    """Make RolloutCallback build engines (of `base`, default RolloutEngine) that record themselves and
    their keyword arguments: returns the list of (engine, kwargs) pairs."""
    from lrnn_lightning.callbacks import rollout as rollout_module

    made = []
    engine_class = base or rollout_module.RolloutEngine

    class RecordingEngine(engine_class):
        def __init__(self, *args, **kwargs):
            made.append((self, kwargs))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(rollout_module, "RolloutEngine", RecordingEngine)
    return made
