"""The small matmuls of a recurrent `step`, each one GPU kernel where that is possible.

A step works on a handful of rows (the batch), where cuBLAS's float32 GEMMs are slow and
come as three or four kernels each (split-K, scaling, reduction, memset), and a captured
step is paid per kernel. On a CUDA GPU with Triton, these functions run one fused kernel
each: `step_kernels.step_matmul_kernel` (LayerNorm prologue, second operand, bias, GEGLU,
residual and scaled-skip epilogues) for the matmuls, `modal_update_kernel` for the complex
recurrence of LRU/S5 (complex64 coefficients). Everywhere else they run the PyTorch
composition they stand for, which is also the reference the tests compare the kernels against.

The kernels run only where they compute what PyTorch would, to float32 rounding:
float32 2-D tensors on a CUDA device, no autocast and no autograd through the call
(`elementwise_kernel_applies`, enough for the modal update: TF32 changes only matmuls); the
matmul kernel also needs TF32 matmuls off and shapes small enough that one kernel beats
cuBLAS (`MAX_MACS`, `kernel_applies`). Under torch.compile a launch is traced as a
user-defined Triton kernel (and the ops around it fused). `LRNN_STEP_KERNELS=0` in the
environment, or `use_step_kernels(False)`, turns them off (e.g. to measure what they gain).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnn_lightning.models.lti_complex import complex_decay_add_, complex_mul

MAX_MACS = 1 << 24  # multiply-adds (rows x outputs x inputs) up to which the one kernel beat cuBLAS on an H100
KERNEL_MODULE = "lrnn_lightning.models.step_kernels"
KERNEL_DEVICE = "cuda"  # the device type the compiled kernel runs on (tests run it interpreted on "cpu")

_enabled = os.environ.get("LRNN_STEP_KERNELS", "1") != "0"


@contextlib.contextmanager
def use_step_kernels(enabled: bool) -> Iterator[None]:
    """Allow (True) or forbid (False) the fused step kernel inside the block.

    A captured CUDA graph keeps the kernels it recorded, so the choice made while capturing holds
    for every replay.
    """
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = previous


_loaded: dict[str, object] = {}  # "module": the compiled kernel module, or None where it cannot run


def _kernel_module():
    # a plain dict lookup (not functools.lru_cache), so torch.compile can trace through it
    if "module" not in _loaded:
        _loaded["module"] = _load_kernel_module()
    return _loaded["module"]


def _load_kernel_module():
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        module = importlib.import_module(KERNEL_MODULE)
    except Exception:  # a broken Triton install: the PyTorch composition still works
        return None
    return None if module.INTERPRETED else module


def preload() -> bool:
    """Import the kernel now (before torch.compile traces a step, which must not import); True if usable."""
    return _kernel_module() is not None


def _tf32_matmuls() -> bool:
    if "tf32" not in _loaded:  # imported on first use: lrnn_lightning.rollout imports this module
        from lrnn_lightning.rollout.inference import matmul_tf32_enabled

        _loaded["tf32"] = matmul_tf32_enabled
    return _loaded["tf32"]()


def elementwise_kernel_applies(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether an elementwise kernel (`modal_update_kernel`) computes this call: float32 2-D tensors on the
    kernel's device, unit column stride, no autograd through them, no autocast, kernels on and importable."""
    if not (_enabled and x.device.type == KERNEL_DEVICE and x.dim() == 2):
        return False
    present = [x, *(t for t in tensors if t is not None)]
    if any(t.dtype != torch.float32 or t.device != x.device or t.stride(-1) != 1 for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return _kernel_module() is not None


def kernel_applies(x: Tensor, *tensors: Tensor | None, macs: int) -> bool:
    """Whether the fused matmul kernel computes this call: the elementwise conditions, `macs` up to MAX_MACS,
    and TF32 matmuls off (under TF32 PyTorch's matmul rounds its inputs; the kernel's fp32 dot would not)."""
    return macs <= MAX_MACS and elementwise_kernel_applies(x, *tensors) and not _tf32_matmuls()


def step_blocks(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps) for an (m, k) x (k, n) product: 16 x 16 output tiles, for many programs,
    and the reduction in blocks of up to 64, because these tiny products are bound by the latency of
    each sequential load, not by arithmetic. (m and n do not change the choice yet: the tuning run
    found 16 x 16 best at every step-sized product.)"""
    # measured on an H100 (experiments/RESULTS.md): 16 x 16 tiles won at every step-sized product
    return 16, 16, max(16, min(64, 1 << (k - 1).bit_length())), 4


def launch_step_matmul(module, x: Tensor, weight: Tensor, n_out: int, *, bias: Tensor | None = None,
                       norm: nn.LayerNorm | None = None, glu: bool = False, x2: Tensor | None = None,
                       weight2: Tensor | None = None, alpha: float = 1.0, alpha2: float = 1.0,
                       residual: Tensor | None = None, skip: Tensor | None = None,
                       skip_scale: Tensor | None = None, blocks: tuple[int, int, int, int] | None = None) -> Tensor:
    """Run `module.step_matmul_kernel` (compiled or interpreted) on 2-D row-major operands -> (M, n_out).

    `blocks` (BM, BN, BK, num_warps) overrides `step_blocks`, for tuning.
    """
    m, k = x.shape
    k2 = 0 if x2 is None else x2.shape[1]
    out = torch.empty(m, n_out, device=x.device, dtype=torch.float32)
    bm, bn, bk, warps = blocks or step_blocks(m, n_out, max(k, k2))
    dummy = out  # never read: its flag is off
    grid = (triton_cdiv(m, bm), triton_cdiv(n_out, bn))
    module.step_matmul_kernel[grid](
        x, x.stride(0), weight.contiguous(), dummy if x2 is None else x2, 0 if x2 is None else x2.stride(0),
        dummy if weight2 is None else weight2.contiguous(), dummy if bias is None else bias,
        dummy if norm is None else norm.weight, dummy if norm is None else norm.bias,
        dummy if residual is None else residual, 0 if residual is None else residual.stride(0),
        dummy if skip is None else skip, 0 if skip is None else skip.stride(0),
        dummy if skip_scale is None else skip_scale, out, out.stride(0),
        m, k, k2, n_out, 0.0 if norm is None else float(norm.eps), float(alpha), float(alpha2),
        HAS_NORM=norm is not None, HAS_X2=x2 is not None, HAS_BIAS=bias is not None, GLU=glu,
        HAS_RES=residual is not None, HAS_SKIP=skip is not None, BM=bm, BN=bn, BK=bk, num_warps=warps)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _norm_applies(norm: nn.LayerNorm | None) -> bool:
    # the kernel's prologue is a LayerNorm over the last dim with an affine weight and bias
    return norm is None or (norm.elementwise_affine and norm.bias is not None and len(norm.normalized_shape) == 1)


def linear_step(x: Tensor, layer: nn.Linear, *, norm: nn.LayerNorm | None = None,
                residual: Tensor | None = None) -> Tensor:
    """`residual + layer(norm(x))` (norm and residual optional): x (B, K) -> (B, N)."""
    weight = layer.weight
    norm_params = () if norm is None else (norm.weight, norm.bias)
    if _norm_applies(norm) and kernel_applies(x, weight, layer.bias, residual, *norm_params,
                                              macs=x.shape[0] * weight.shape[0] * weight.shape[1]):
        return launch_step_matmul(_kernel_module(), x, weight, weight.shape[0], bias=layer.bias, norm=norm,
                                  residual=residual)
    y = layer(x if norm is None else norm(x))
    return y if residual is None else residual + y


def gated_linear_step(x: Tensor, layer: nn.Linear, *, norm: nn.LayerNorm | None = None) -> Tensor:
    """GEGLU: value * gelu(gate) for `value, gate = layer(norm(x)).chunk(2, -1)`: x (B, K) -> (B, N / 2)."""
    weight = layer.weight
    norm_params = () if norm is None else (norm.weight, norm.bias)
    if _norm_applies(norm) and kernel_applies(x, weight, layer.bias, *norm_params,
                                              macs=x.shape[0] * weight.shape[0] * weight.shape[1]):
        return launch_step_matmul(_kernel_module(), x, weight, weight.shape[0] // 2, bias=layer.bias, norm=norm,
                                  glu=True)
    value, gate = layer(x if norm is None else norm(x)).chunk(2, dim=-1)
    return value * F.gelu(gate)


def matmul_step(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T for x (B, K) and weight (N, K) -> (B, N)."""
    if kernel_applies(x, weight, macs=x.shape[0] * weight.shape[0] * weight.shape[1]):
        return launch_step_matmul(_kernel_module(), x, weight, weight.shape[0])
    return x @ weight.T


def dual_readout_step(a: Tensor, wa: Tensor, b: Tensor, wb: Tensor, alpha: float, skip: Tensor,
                      skip_scale: Tensor, *, allow_kernel: bool = True) -> Tensor:
    """skip * skip_scale + alpha * (a @ wa.T) - alpha * (b @ wb.T): a, b (B, P), wa, wb (H, P), skip (B, H) -> (B, H).

    The readout c Re(C h) + D x of a complex diagonal SSM, with h = a + i b and C = wa + i wb.
    allow_kernel=False keeps PyTorch (for the parallel pass, whose rows are flattened sequences).
    """
    macs = 2 * a.shape[0] * wa.shape[0] * wa.shape[1]
    if allow_kernel and kernel_applies(a, wa, b, wb, skip, skip_scale, macs=macs):
        return launch_step_matmul(_kernel_module(), a, wa, wa.shape[0], x2=b, weight2=wb, alpha=alpha,
                                  alpha2=-alpha, skip=skip, skip_scale=skip_scale)
    y = torch.addmm(skip * skip_scale, a, wa.T, alpha=alpha)
    return y.addmm_(b, wb.T, alpha=-alpha)


def modal_update_step(h_re: Tensor, h_im: Tensor, decay: Tensor, u_re: Tensor, u_im: Tensor,
                      scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """h <- decay * h + scale * u in place for complex modes held as real pairs; returns the new (h_re, h_im).

    Shapes: h_re, h_im (B, P) contiguous state; u_re, u_im (B, P) (row-strided views are fine);
    decay and scale complex, (P,) or (B, P), scale optional. One kernel on a GPU instead of ten
    (`complex_mul` and `complex_decay_add_`, which it stands for everywhere else).
    """
    coefficients = [c for c in (decay, scale) if c is not None]
    usable = (h_re.dim() == 2 and h_re.is_contiguous() and h_im.is_contiguous() and h_im.shape == h_re.shape
              and u_re.shape == h_re.shape and u_im.shape == h_re.shape and u_re.stride() == u_im.stride()
              and all(c.dtype == torch.complex64 and c.shape[-1] == h_re.shape[1] and c.dim() <= 2
                      and (c.dim() == 1 or c.shape[0] == h_re.shape[0]) for c in coefficients))
    if usable and elementwise_kernel_applies(h_re, h_im, u_re, u_im):
        pairs = [torch.view_as_real(c.contiguous()) for c in coefficients]
        decay_pairs, scale_pairs = pairs[0], pairs[1] if scale is not None else pairs[0]
        rows, modes = h_re.shape
        block = 256
        _kernel_module().modal_update_kernel[(triton_cdiv(rows * modes, block),)](
            h_re, h_im, u_re, u_im, u_re.stride(0), decay_pairs, 0 if decay.dim() == 1 else 2 * modes,
            scale_pairs, 0 if scale is None or scale.dim() == 1 else 2 * modes, rows, modes,
            HAS_SCALE=scale is not None, BLOCK=block, num_warps=4)
        return h_re, h_im
    if scale is not None:
        u_re, u_im = complex_mul(scale, u_re, u_im)
    return complex_decay_add_(h_re, h_im, decay, u_re, u_im)
