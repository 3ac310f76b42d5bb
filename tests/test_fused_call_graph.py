"""The fused call-graph cache (`fused.call_graph`): when a call is captured, kept, dropped and released.

The cache's policy runs on the CPU with a stand-in for the capture; the captured graphs
themselves (replay == eager launch, live weights, re-capture) are tested on a GPU in
test_fused_call_graph_cuda.py.
"""

from __future__ import annotations

import gc

import pytest
import torch

from lrnn_lightning.rollout.fingerprint import model_signature
from lrnn_lightning.rollout.fused.call_graph import (
    MAX_CALL_GRAPHS,
    CallKey,
    captured_calls,
    release_calls,
    replayed_call,
)
from lrnn_lightning.rollout.fused.config import KernelConfig
from tests.test_fused import make_model


def key(num_steps: int = 16, batch: int = 4, config: KernelConfig | None = None) -> CallKey:
    return CallKey(stream=0, batch=batch, width=3, x_dtype=torch.float32, num_steps=num_steps, event=False,
                   weight_dtype=torch.float32, precision="ieee", config=config, state=None)


class Captures:
    """A stand-in for `CallGraph(...)`: counts the captures and hands out a fresh object each time."""

    def __init__(self, fail: bool = False):
        self.made: list[object] = []
        self.fail = fail

    def __call__(self) -> object:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.made.append(object())
        return self.made[-1]


def test_a_call_is_captured_the_second_time_and_replayed_after():
    model = make_model("lru")
    signature, capture = model_signature(model), Captures()
    assert replayed_call(model, signature, key(), capture) is None and capture.made == []  # first: eager
    graph = replayed_call(model, signature, key(), capture)
    assert capture.made == [graph] and captured_calls(model) == [key()]
    assert replayed_call(model, signature, key(), capture) is graph and len(capture.made) == 1
    other = key(num_steps=17)  # another shape: its own first sighting
    assert replayed_call(model, signature, other, capture) is None and len(capture.made) == 1
    release_calls(model)
    assert captured_calls(model) == [] and replayed_call(model, signature, key(), capture) is None


def test_a_changed_model_drops_its_graphs():
    model = make_model("lru")
    capture = Captures()
    for _ in range(2):
        replayed_call(model, model_signature(model), key(), capture)
    assert captured_calls(model) == [key()]
    model.load_state_dict({name: value.clone() for name, value in model.state_dict().items()}, assign=True)
    signature = model_signature(model)
    assert replayed_call(model, signature, key(), capture) is None and captured_calls(model) == []
    assert replayed_call(model, signature, key(), capture) is capture.made[-1] and len(capture.made) == 2


def test_at_most_max_call_graphs_are_kept_least_recently_used_dropped_first():
    model = make_model("lru")
    signature, capture = model_signature(model), Captures()
    keys = [key(num_steps=n) for n in range(1, MAX_CALL_GRAPHS + 2)]
    for k in keys[:MAX_CALL_GRAPHS]:
        for _ in range(2):
            replayed_call(model, signature, k, capture)
    replayed_call(model, signature, keys[0], capture)  # used again: now the most recent
    for _ in range(2):
        replayed_call(model, signature, keys[-1], capture)
    assert captured_calls(model) == [*keys[2:MAX_CALL_GRAPHS], keys[0], keys[-1]]


def test_a_call_that_cannot_be_captured_runs_eagerly_after_one_warning():
    model = make_model("lru")
    signature, failing = model_signature(model), Captures(fail=True)
    replayed_call(model, signature, key(batch=7), failing)
    with pytest.warns(RuntimeWarning, match=r"\(batch 7, 16 steps\) could not be captured as a CUDA graph "
                                            r"\(RuntimeError: operation not permitted"):
        assert replayed_call(model, signature, key(batch=7), failing) is None
    capture = Captures()
    assert replayed_call(model, signature, key(batch=7), capture) is None and capture.made == []  # no retry


def test_the_cache_does_not_keep_a_model_alive():
    model = make_model("lru")
    signature, capture = model_signature(model), Captures()
    for _ in range(2):
        replayed_call(model, signature, key(), capture)
    from lrnn_lightning.rollout.fused import call_graph

    before = len(call_graph._CALLS)
    del model
    gc.collect()
    assert len(call_graph._CALLS) == before - 1


def test_replays_can_be_switched_off(monkeypatch):
    from lrnn_lightning.rollout.fused import call_graph

    monkeypatch.setattr(call_graph, "ENABLED", False)
    model = make_model("lru")
    signature, capture = model_signature(model), Captures()
    for _ in range(3):
        assert replayed_call(model, signature, key(), capture) is None
    assert capture.made == [] and captured_calls(model) == []


def square_weight(model) -> torch.Tensor:
    return next(p for p in model.parameters() if p.dim() >= 2 and p.shape[-1] == p.shape[-2])


def swap_in_another_mlp_type(model) -> None:
    """The first block's MLP becomes an instance of a subclass that holds the very same Linear layers."""
    block = model.layers[0]
    swapped = type("OtherMLP", (type(block.mlp),), {})(model.d_model)
    swapped.up, swapped.down = block.mlp.up, block.mlp.down
    block.mlp = swapped


def test_the_model_signature_sees_every_change_a_captured_graph_cannot_follow():
    model = make_model("lru", n_layers=2, d_model=8, d_state=8)  # LRU's B: (2, 8, 8), restrided in place
    before = model_signature(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # in place: a graph follows
    assert model_signature(model) == before
    changes = {
        "replaced storage": lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()},
                                                        assign=True),
        "new dtype": lambda m: m.double(),
        "restrided in place, same shape": lambda m: square_weight(m).transpose_(-1, -2),
        "swapped tensors": lambda m: setattr(m.final_norm, "weight", m.layers[0].mixer_norm.weight),
        "a layer removed": lambda m: m.layers.__delitem__(1),
        "a module of another type, same tensors": swap_in_another_mlp_type,
    }
    for what, change in changes.items():
        changed = make_model("lru", n_layers=2, d_model=8, d_state=8)
        signature = model_signature(changed)
        tensors = [t.data_ptr() for t in changed.parameters()]
        with torch.no_grad():
            change(changed)
        assert model_signature(changed) != signature, what
        if what.startswith(("restrided", "a module of")):  # only the stride or the type tells these apart
            assert [t.data_ptr() for t in changed.parameters()] == tensors, what
