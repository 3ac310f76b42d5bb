"""Compile the fused kernel for a GPU architecture without a GPU: catches compile errors and resource overruns early.

Triton lowers to PTX and runs its bundled ptxas on the host, so a CPU machine can check
that a configuration compiles for sm_90 (H100) and how much shared memory it needs.

    info = compile_for_target(model, event=True, weight_dtype=torch.float32)
    info.shared_bytes, info.compile_s

    python -m lrnn_lightning.rollout.fused.aot     # the configurations of the GPU tests and the benchmark
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lrnn_lightning.rollout.fused.config import KernelConfig, small_tile_config
from lrnn_lightning.rollout.fused.launch import build_call
from lrnn_lightning.rollout.fused.pack import pack_model

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one program may use (A100, H100)
SM_COUNT = {80: 108, 90: 132}  # SMs of an A100 and an H100 SXM: how far a split launch may spread


@dataclass
class CompileInfo:
    """What compiling one configuration gave.

    Attributes:
        constexprs: the kernel's specialisation.
        shared_bytes: shared memory per program.
        compile_s: wall time of the compilation.
        fits: shared memory within the architecture's per-block limit.
        ttgir: the kernel in Triton's GPU dialect, register layouts included (`loop_conversions`).
    """

    constexprs: dict
    shared_bytes: int
    compile_s: float
    fits: bool
    ttgir: str = field(default="", repr=False)


def loop_conversions(ttgir: str) -> list[int]:
    """Register-layout conversions (`ttg.convert_layout`) in each outermost loop of a kernel's TTGIR, in order.

    Outside a loop a conversion runs once; inside the step loop each one between warps is a
    trip through shared memory with barriers, on every step.
    """
    counts, depth = [], 0
    for line in ttgir.splitlines():
        if depth == 0 and "scf.for" in line:
            counts.append(0)
        elif depth > 0 and "ttg.convert_layout" in line:
            counts[-1] += 1
        if counts and (depth > 0 or "scf.for" in line):
            depth += line.count("{") - line.count("}")
    return counts


def _specialize(fn, call) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attributes as Triton's JIT would derive them from these arguments
    (ints equal to 1 become constexprs, 16-divisible ints and pointers get divisibility hints)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    values = dict(zip(fn.arg_names[:len(call.args)], call.args, strict=True))  # the constexprs come last
    signature, constexprs, attrs = {}, dict(call.constexprs), {}
    for index, param in enumerate(fn.params):
        if param.name in call.constexprs:
            signature[param.name] = "constexpr"
            continue
        if param.is_constexpr:  # a constexpr passed positionally (the register kernel's model sizes)
            signature[param.name], constexprs[param.name] = "constexpr", values[param.name]
            continue
        kind, attr = native_specialize_impl(BaseBackend, values[param.name], False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


def compile_for_target(model: nn.Module, *, event: bool = False, weight_dtype: torch.dtype = torch.float32,
                       precision: str = "ieee", config: KernelConfig | None = None, batch: int = 16,
                       arch: int = 90, n_sms: int | None = None) -> CompileInfo:
    """Compile the fused kernel `config` picks for `model` (on the CPU) for CUDA compute capability `arch` (90: H100).

    n_sms: the target GPU's SMs, which bound a split launch (None: SM_COUNT[arch]).

    Raises whatever Triton raises on a compile error (CompilationError with the offending line).
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_for_target: TRITON_INTERPRET=1 is set, so Triton would not compile. "
                           "HINT: run in a process without TRITON_INTERPRET.")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lrnn_lightning.rollout.fused.kernels import rollout as kernels

    config = config or KernelConfig()
    width = model.d_input
    with torch.no_grad():
        packed = pack_model(model, weight_dtype, event, fold=config.activations == "phased")
        x0 = torch.zeros(batch, width, device=packed.common["enc_b"].device)
        dt = torch.ones(batch, 2, device=x0.device) if event else None
        call = build_call(packed, x0, None, 2, dt, precision, config, interpreted=False,
                          n_sms=n_sms or SM_COUNT.get(arch))
    fn = getattr(kernels, call.kernel)
    signature, constexprs, attrs = _specialize(fn, call)
    start = time.perf_counter()
    options = {"num_warps": call.num_warps, "num_stages": call.num_stages, "launch_cooperative_grid": call.cooperative}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options=options)
    shared = int(kernel.metadata.shared)
    return CompileInfo(call.constexprs, shared, time.perf_counter() - start,
                       shared <= SHARED_LIMIT.get(arch, 48 * 1024), kernel.asm["ttgir"])


def _main() -> None:
    from lrnn_lightning.models import SequenceModel

    cases = [("lru", {}, False), ("lru", {}, True), ("s5", {"discretization": "zoh"}, True),
             ("s5", {"discretization": "bilinear"}, False), ("s5", {"discretization": "dirac"}, True),
             ("s4d", {}, True), ("s4d", {}, False), ("mamba", {}, True), ("rglru", {}, True)]
    for name, kwargs, event in cases:
        model = SequenceModel(name, d_input=3, d_output=3, d_model=128, d_state=64, n_layers=2, mixer_kwargs=kwargs)
        for weight_dtype, precision, config in ((torch.float32, "ieee", KernelConfig()),
                                                (torch.float32, "tf32x3", KernelConfig()),
                                                (torch.bfloat16, "ieee", KernelConfig()),
                                                (torch.float32, "ieee", small_tile_config(1)),
                                                (torch.bfloat16, "ieee", small_tile_config(8))):
            info = compile_for_target(model, event=event, weight_dtype=weight_dtype, precision=precision, config=config)
            print(f"{name:6s} {kwargs!s:28s} event={event!s:5s} {str(weight_dtype):15s} {precision:6s} "
                  f"block_b={config.block_b:2d} shared={info.shared_bytes:6d} B fits={info.fits} "
                  f"{info.compile_s:.1f} s")


if __name__ == "__main__":
    _main()
