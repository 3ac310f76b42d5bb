"""`pack_live`: the fused kernel's packed weights from the live parameters, with the packing replayed as a CUDA graph.

Packing (`pack.pack_model`) is a few dozen small PyTorch ops per launch: up to 1 ms of
launch overhead on an H100 host, more than a 64-step rollout of a small model spends in
the kernel. On a GPU the packing is therefore captured once per (model, weight dtype,
event mode, stream) and replayed before every eager launch (a call shape seen before packs
inside its own call graph instead, `call_graph.py`): one graph launch recomputes every
packed tensor, at its fixed address, from the parameters' current values, so optimizer
steps and in-place loads are seen exactly as in eager packing. A parameter or buffer
replaced by other memory (`.to()`, `load_state_dict(assign=True)`) changes the model's
fingerprint and the packing is captured again; a model re-captured MAX_RECAPTURES times
(something swaps its tensors every rollout) and a packing that cannot be captured are
packed eagerly from then on. Plain Python attributes the packing reads (LayerNorm eps,
S5's discretisation, LRU/S5's output scale) are structural: fixed at construction, read
at capture. `release_packing(model)` frees a model's captured packings (the engine's
`release` does).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from lrnn_lightning.rollout.fingerprint import Fingerprint, model_fingerprint
from lrnn_lightning.rollout.fused.pack import PackedModel, pack_model
from lrnn_lightning.rollout.step_graph import capture_graph

MAX_RECAPTURES = 8
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


class PackGraph:
    """`pack_model(model, weight_dtype, event, fold)` captured as a CUDA graph; `replay()` refreshes `packed` in
    place."""

    def __init__(self, model: nn.Module, weight_dtype: torch.dtype, event: bool, fold: bool, device: torch.device,
                 recaptures: int = 0):
        self.fingerprint: Fingerprint = model_fingerprint(model)
        self.recaptures = recaptures
        with torch.no_grad():
            self.graph, self.packed = capture_graph(device, lambda: pack_model(model, weight_dtype, event, fold))

    def replay(self) -> PackedModel:
        self.graph.replay()
        return self.packed


class _EagerPacking:
    """A packing that is not replayed (capture failed, or too many re-captures): `pack_model` at every call."""

    def __init__(self, model: nn.Module, weight_dtype: torch.dtype, event: bool, fold: bool):
        self.model = weakref.ref(model)
        self.weight_dtype, self.event, self.fold = weight_dtype, event, fold

    def replay(self) -> PackedModel:
        return pack_model(self.model(), self.weight_dtype, self.event, self.fold)


def pack_live(model: nn.Module, weight_dtype: torch.dtype, event: bool, fold: bool = False) -> PackedModel:
    """The packed weights of `model`'s current parameters (same values as `pack_model(..., fold)`).

    On a CUDA device outside any graph capture, a replay of the captured packing: the
    returned tensors belong to the current stream's packing of this model and are
    overwritten by its next call there, so use them (launch on this stream) before packing
    again. Elsewhere (CPU, the Triton interpreter), `pack_model` itself.
    """
    device = next(model.parameters()).device
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return pack_model(model, weight_dtype, event, fold)
    graphs = _GRAPHS.setdefault(model, {})
    # one packing per stream: a launch still reading the buffers on another stream is never overwritten
    key = (weight_dtype, event, fold, torch.cuda.current_stream(device).cuda_stream)
    cached = graphs.get(key)
    if isinstance(cached, _EagerPacking):
        return cached.replay()
    if cached is None or cached.fingerprint != model_fingerprint(model):
        recaptures = 0 if cached is None else cached.recaptures + 1
        graphs.pop(key, None)
        cached = None  # the old graph and its pool are freed before the new capture
        if recaptures >= MAX_RECAPTURES:
            warnings.warn(f"fused rollout: the model's parameters were replaced {recaptures} times; packing its "
                          "weights eagerly at every launch from now on (no CUDA graph).", stacklevel=2)
            graphs[key] = _EagerPacking(model, weight_dtype, event, fold)
            return pack_model(model, weight_dtype, event, fold)
        try:
            cached = graphs[key] = PackGraph(model, weight_dtype, event, fold, device, recaptures)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # an op that cannot be captured: correct, just slower
            warnings.warn(f"fused rollout: packing the weights could not be captured as a CUDA graph ({error}); "
                          "packing eagerly at every launch.", stacklevel=2)
            graphs[key] = _EagerPacking(model, weight_dtype, event, fold)
            return pack_model(model, weight_dtype, event, fold)
    return cached.replay()


def release_packing(model: nn.Module) -> None:
    """Free every captured packing of `model` (graphs and their memory pools); the next launch captures again."""
    _GRAPHS.pop(model, None)
