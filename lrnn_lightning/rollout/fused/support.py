"""Whether the fused Triton kernel covers a model, and whether Triton can run it here.

Nothing here imports Triton at module load: the CPU CI without Triton must be able to ask.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import weakref

import torch
from torch import nn

from lrnn_lightning.rollout.fingerprint import model_signature

KERNEL_MODULE = "lrnn_lightning.rollout.fused.kernels.rollout"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
MIN_CAPABILITY = (8, 0)  # Ampere: tl.dot in bf16 and tf32 paths
# the last answers per model, under its `model_signature`: asked before every fused rollout
_ANSWERS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]] = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=1)
def triton_version() -> str | None:
    """Triton's version if it imports, else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
    except Exception:  # a broken install is as good as none
        return None
    return str(triton.__version__)


def interpreter_active() -> bool:
    """Whether the fused kernel runs in (or will be built for) the Triton interpreter (TRITON_INTERPRET=1).

    Triton picks interpreted or compiled when a kernel is defined, so once the kernel
    module is imported its choice holds for the process.
    """
    module = sys.modules.get(KERNEL_MODULE)
    if module is not None:
        return bool(module.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def model_coverage(model: nn.Module) -> tuple[bool, str]:
    """Whether the kernel implements `model`'s architecture (structure only, no device check)."""
    from lrnn_lightning.models.backbone import GatedMLP, ResidualBlock, SequenceModel
    from lrnn_lightning.models.mamba import Mamba
    from lrnn_lightning.models.rglru import RGLRU
    from lrnn_lightning.rollout.fused.pack import MIXER_IDS

    if type(model) is not SequenceModel:
        return False, f"{type(model).__name__} is not a SequenceModel (the kernel implements exactly that backbone)"
    if model.d_input != model.d_output:
        return False, f"d_input={model.d_input} != d_output={model.d_output}"
    layers = list(model.layers)
    mixer_types = {type(layer.mixer) for layer in layers}
    if len(mixer_types) != 1:
        return False, f"mixed mixer types {sorted(t.__name__ for t in mixer_types)}"
    mixer_type = mixer_types.pop()
    if mixer_type not in MIXER_IDS:
        covered = ", ".join(sorted(t.__name__ for t in MIXER_IDS))
        return False, f"mixer {mixer_type.__name__} is not covered (covered: {covered})"
    norms = [model.final_norm] + [n for layer in layers for n in (layer.mixer_norm, layer.mlp_norm)]
    for layer in layers:
        if type(layer) is not ResidualBlock or type(layer.mlp) is not GatedMLP:
            return False, "a layer is not the standard ResidualBlock with a GatedMLP"
    if len({_layer_configuration(layer) for layer in layers}) != 1:
        return False, ("layers of different sizes or mixer settings (the kernel reads every layer's weights from "
                       "one stack over layers)")
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None \
                or tuple(norm.normalized_shape) != (model.d_model,):
            return False, "a LayerNorm without affine weight and bias over d_model"
    if len({float(norm.eps) for norm in norms}) != 1:
        return False, "LayerNorms with different eps"
    mixer = layers[0].mixer
    if isinstance(mixer, Mamba) and mixer.d_state > 256:
        return False, f"Mamba d_state={mixer.d_state} > 256 (its state tile holds all of N)"
    if isinstance(mixer, Mamba) and any(lin.bias is not None for lin in (mixer.in_proj, mixer.x_proj, mixer.out_proj)):
        return False, "a Mamba projection with a bias (the kernel follows mamba.py: none)"
    if isinstance(mixer, RGLRU) and any(lin.bias is None for lin in (mixer.in_proj, mixer.gates, mixer.out_proj)):
        return False, "an RG-LRU projection without a bias"
    if any(lin.bias is None for lin in (model.encoder, model.decoder)) or any(
            layer.mlp.up.bias is None or layer.mlp.down.bias is None for layer in layers):
        return False, "a Linear without a bias in the backbone"
    return True, f"{model.mixer_name} x {len(layers)} layers covered"


def _layer_configuration(layer: nn.Module) -> tuple:
    """What must be equal across a covered model's layers: the mixer's settings (its `extra_repr`, e.g. S5's
    discretization, and its output scale) and every parameter's name and shape."""
    mixer = layer.mixer
    shapes = tuple((name, tuple(p.shape)) for name, p in layer.named_parameters())
    return mixer.extra_repr(), getattr(mixer, "output_scale", None), shapes


def fused_support(model: nn.Module, weight_dtype: torch.dtype | None = None, *,
                  signature: tuple | None = None) -> tuple[bool, str]:
    """Whether `fused_rollout` can run `model` where it lives now, and why not.

    Checks the architecture (`model_coverage`), the weights' dtype and device, Triton, and
    the GPU's compute capability. On the CPU the answer is yes only under the Triton
    interpreter (TRITON_INTERPRET=1), which is for tests: slow. The answer is kept until the
    model's `model_signature` changes (a tensor replaced or moved, a module swapped); plain
    attributes the kernel reads (LayerNorm eps, discretisation) count as fixed at construction.

    Args:
        model: the model to roll out.
        weight_dtype: the kernel's tl.dot weight dtype to check (None: the model's).
        signature: `fingerprint.model_signature(model)` if the caller has just taken it (None: taken here).

    Returns:
        (covered, reason): the reason says what runs, or what is missing.

    Example:
        >>> ok, why = fused_support(model)
        >>> ok, why
        (False, 'mixer Foo is not covered (covered: LRU, Mamba, RGLRU, S4D, S5)')
    """
    signature = signature or model_signature(model)
    cached = _ANSWERS.get(model)
    if cached is None or cached[0] != signature:
        cached = _ANSWERS[model] = (signature, {})
    key = (weight_dtype, interpreter_active(), triton_version())
    if key not in cached[1]:
        cached[1][key] = _support(model, weight_dtype)
    return cached[1][key]


def _support(model: nn.Module, weight_dtype: torch.dtype | None) -> tuple[bool, str]:
    covered, why = model_coverage(model)
    if not covered:
        return False, why
    params = [p for p in model.parameters() if p.is_floating_point()]
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) != 1 or len(dtypes) != 1:
        return False, f"parameters on several devices or dtypes ({sorted(map(str, devices | dtypes))})"
    device, dtype = devices.pop(), dtypes.pop()
    for kind, value in (("weights in", dtype), ("weight_dtype", weight_dtype)):
        if value is not None and value not in WEIGHT_DTYPES:
            return False, f"{kind} {value} (the kernel takes float32 or bfloat16)"
    version = triton_version()
    if version is None:
        return False, "Triton is not importable (pip install triton)"
    if device.type == "cuda":
        if interpreter_active():
            return False, "TRITON_INTERPRET=1 is set, so Triton would interpret the kernel on the host"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return False, f"GPU compute capability {capability} < {MIN_CAPABILITY}"
        kind = weight_dtype or dtype
        return True, f"{why}; Triton {version} on {torch.cuda.get_device_name(device)}, {str(kind).split('.')[-1]}"
    if device.type == "cpu" and interpreter_active():
        return True, f"{why}; Triton {version} interpreter on the CPU (TRITON_INTERPRET=1: slow, for tests)"
    return False, f"the model is on {device}, not a CUDA GPU"
