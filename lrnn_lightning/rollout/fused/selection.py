"""`choose_backend`: which rollout backend runs (fused kernel, CUDA graph or plain loop), and why."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from lrnn_lightning.rollout.checks import model_device_dtype
from lrnn_lightning.rollout.fused.config import next_pow2, processor_count
from lrnn_lightning.rollout.fused.pack import MIXER_IDS, MODAL
from lrnn_lightning.rollout.fused.phased_launch import phased_pays
from lrnn_lightning.rollout.fused.support import fused_support

BACKENDS = ("fused", "graph", "loop")
# fused="auto" takes the kernel up to this many batch rows per SM: on an H100 it was 1.6-5.4x faster than the CUDA
# graph from B=1 to B=256 (two rows per SM), and 3-11x slower at B=1024 (d_model 512; experiments/RESULTS.md).
# Beyond, only for LRU / S5 models from a padded d_model of BF16_AUTO_MIN_D_MODEL on with bf16 weights
# (`wide_modal_bf16`): whole rollouts through the engine at (B, 512, 128, 8) took 453 / 468 µs a step (B=1024 / 512,
# LRU) against 923 / 750 for the CUDA graph under the same bf16 autocast; calls of 64 steps through the engine ran
# 3.2-3.9x faster than that graph at d_model 256 (B=512, 1024) and 3.5-5.0x at d_model 128 (B=512-2048, sixteenth
# session); with fp32 weights the kernel ran 2.3-3.1x slower than the fp32 graph at d_model 512, and 0.61-0.97x its
# speed at d_model 128
AUTO_MAX_ROWS_PER_SM = 2
BF16_AUTO_MIN_D_MODEL = 128


class BackendChoice(NamedTuple):
    """The backend a rollout takes ("fused", "graph" or "loop") and the reason to log; unpacks as a pair."""

    backend: str
    reason: str


class FusedChoice(NamedTuple):
    """The fused half of a backend choice (`choose_fused`).

    Attributes:
        fused: whether the rollout takes the fused kernel.
        reason: the part of the reason that concerns the kernel, e.g. "fused=auto: lru x 4 layers covered; ...",
            "fused=auto, not fused: no CUDA GPU" or "fused=false".
        refusal: `fused_support`'s reason when it said the kernel cannot run the model, else None.
    """

    fused: bool
    reason: str
    refusal: str | None


def choose_fused(model: nn.Module, fused: bool | str, weight_dtype: torch.dtype | None, on_gpu: bool,
                 batch: int | None = None, n_sms: int | None = None, *, signature: tuple | None = None) -> FusedChoice:
    """Whether a rollout of `model` takes the fused kernel, asking `fused_support` at most once; never raises
    (a caller that required the kernel raises on `refusal`).

    Args:
        model: the model to roll out.
        fused: True, False or "auto" (validated by the caller).
        weight_dtype: the kernel's matmul weight dtype (None: the model's).
        on_gpu: whether the model is on a CUDA GPU ("auto" takes the kernel only there).
        batch: the rollout's rows, if known: "auto" takes the kernel only up to AUTO_MAX_ROWS_PER_SM
            rows per SM, where it was measured faster than the CUDA graph, and beyond for LRU / S5 models of a
            padded d_model of 128 or more (d_model >= 65) on bf16 weights (`wide_modal_bf16`).
        n_sms: the GPU's SMs (None: the current CUDA device's).
        signature: `fingerprint.model_signature(model)` if the caller has just taken it (None: taken here).
    """
    if fused is False:
        return FusedChoice(False, "fused=false", None)
    asked = "fused=true" if fused is True else "fused=auto"
    covered, why = fused_support(model, weight_dtype, signature=signature)
    if not covered:
        return FusedChoice(False, f"{asked}, not fused: {why}", why)
    if fused is not True and not on_gpu:
        return FusedChoice(False, f"{asked}, not fused: no CUDA GPU", None)
    if fused is not True and batch is not None:
        n_sms = n_sms or processor_count(torch.device("cuda"))
        beyond = -(-batch // n_sms) > AUTO_MAX_ROWS_PER_SM
        if beyond and wide_modal_bf16(model, weight_dtype):
            mixer_id = MIXER_IDS[type(model.layers[0].mixer)]
            steps = ("phased steps" if phased_pays(mixer_id, model.d_model, batch, n_sms, torch.bfloat16, "ieee")
                     else "the register kernel's tiles")
            return FusedChoice(True, f"{asked}: {why}; {batch} rows on {n_sms} SMs take {steps} on bf16 weights, "
                                     "where the kernel was faster than the CUDA graph", None)
        if beyond:
            return FusedChoice(False, f"{asked}, not fused: {batch} rows are more than {AUTO_MAX_ROWS_PER_SM} per SM "
                                      f"({n_sms} SMs), where the CUDA graph was faster (fused=true forces the kernel)",
                               None)
    return FusedChoice(True, f"{asked}: {why}", None)


def wide_modal_bf16(model: nn.Module, weight_dtype: torch.dtype | None) -> bool:
    """Whether the covered `model` is an LRU / S5 one from a padded d_model of BF16_AUTO_MIN_D_MODEL on, rolled out
    on bf16 weights (`weight_dtype`, or the model's own when None): past AUTO_MAX_ROWS_PER_SM rows per SM its
    launch (phased steps, kernels/phased.py, or at d_model 128 below `phased_launch.phased_pays`'s batch the
    register kernel's tiles) was measured faster than the CUDA graph."""
    dtype = weight_dtype if weight_dtype is not None else next(model.parameters()).dtype
    return (dtype == torch.bfloat16 and MIXER_IDS.get(type(model.layers[0].mixer)) == MODAL
            and next_pow2(model.d_model) >= BF16_AUTO_MIN_D_MODEL)


def graph_or_loop(fused_reason: str, device: torch.device, cuda_graph: bool | str, *, use_graph: bool,
                  graph_failed: bool = False) -> BackendChoice:
    """The CUDA graph (`use_graph`) or the plain loop after the fused kernel was not taken, with the whole reason."""
    if use_graph:
        return BackendChoice("graph", f"{fused_reason}; CUDA graph on {device}")
    cause = ("the graph capture failed earlier" if graph_failed
             else "cuda_graph=false" if cuda_graph is False else "no CUDA GPU")
    return BackendChoice("loop", f"{fused_reason}; plain step loop ({cause})")


def choose_backend(model: nn.Module, fused: bool | str = "auto", cuda_graph: bool | str = "auto",
                   weight_dtype: torch.dtype | None = None, batch: int | None = None) -> BackendChoice:
    """The backend a rollout of `model` takes where it lives now, with the reason to log.

    `fused="auto"` takes the fused kernel when `fused_support` says yes, the model is on a
    GPU (the Triton interpreter is never chosen automatically) and the batch, if given, is
    at most AUTO_MAX_ROWS_PER_SM rows per SM or an LRU / S5 model of a padded d_model of 128 or more
    (d_model >= 65, measured at 128) runs on bf16 weights (`wide_modal_bf16`); else what `cuda_graph` gives:
    the graph on a GPU unless it is False, else the loop. Explicit requests that cannot be honoured raise
    instead of falling back silently.

    Args:
        model: the model to roll out (its parameters say the device).
        fused: True (require the fused kernel), False, or "auto".
        cuda_graph: True (require a CUDA graph when not fused), False, or "auto", as in RolloutEngine.
        weight_dtype: the fused kernel's matmul weight dtype the caller would use (None: the model's;
            torch.bfloat16 for a bf16 autocast rollout; float16 is not covered).
        batch: the rollout's batch rows, if known (see above).

    Returns:
        BackendChoice(backend, reason), a (backend, reason) pair: backend is "fused", "graph" or "loop".

    Example:
        >>> backend, reason = choose_backend(model.cuda(), fused="auto")
        >>> backend, reason
        ('fused', 'fused=auto: lru x 4 layers covered; Triton 3.1.0 on NVIDIA H100 80GB HBM3, float32')
    """
    for name, value in (("fused", fused), ("cuda_graph", cuda_graph)):
        if not (value is True or value is False or value == "auto"):
            raise ValueError(f"choose_backend: {name} must be True, False or 'auto', got {value!r}.")
    device = model_device_dtype(model, torch.empty(0))[0]
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    choice = choose_fused(model, fused, weight_dtype, on_gpu, batch, processor_count(device) if on_gpu else None)
    if fused is True and choice.refusal is not None:
        raise ValueError(f"choose_backend: fused=True, but the fused kernel cannot run this model: {choice.refusal}. "
                         "HINT: set generation.fused=auto to fall back to the CUDA graph or the loop.")
    if choice.fused:
        return BackendChoice("fused", choice.reason)
    if cuda_graph is True and not on_gpu:
        raise ValueError(f"choose_backend: cuda_graph=True needs the model on a CUDA GPU, but it is on {device}. "
                         "HINT: set cuda_graph='auto' or False, or move the model to a GPU.")
    return graph_or_loop(choice.reason, device, cuda_graph, use_graph=cuda_graph is not False and on_gpu)
