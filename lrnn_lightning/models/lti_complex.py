"""Complex arithmetic for the diagonal LTI mixers, with the state kept as real tensors.

The recurrent state of LRU, S4D and S5 is complex but is stored as a real pair
(h_re, h_im) so the rollout engine can zero, pad and copy it like any other state and
torch.compile sees only real tensors. The helpers here do the per-step complex updates
on such pairs with as few kernels as possible (each `addcmul` fuses a multiply and an
add), build the powers that turn the recurrence into a convolution, and bring
parameters and inputs to the working precision (at least float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

_AT_LEAST_FLOAT32 = (torch.float32, torch.float64)


def complex_mul(scale: Tensor, re: Tensor, im: Tensor) -> tuple[Tensor, Tensor]:
    """(re + i im) * scale for a complex `scale` broadcastable to the real pair; 4 kernels.

    Args:
        scale: complex tensor, broadcastable to `re`.
        re, im: real and imaginary parts, same shape.

    Returns:
        The real and imaginary parts of the product.
    """
    out_re = torch.mul(re, scale.real).addcmul_(im, scale.imag, value=-1)
    out_im = torch.mul(im, scale.real).addcmul_(re, scale.imag)
    return out_re, out_im


def complex_decay_add_(h_re: Tensor, h_im: Tensor, decay: Tensor, u_re: Tensor, u_im: Tensor) -> tuple[Tensor, Tensor]:
    """h <- decay * h + u in place, for h = h_re + i h_im held as two real tensors; 6 kernels.

    The update is computed in the promoted dtype of the operands and written into the
    state with `copy_`, so a state of lower precision than the computation (a bfloat16
    state of a float32 computation) is updated in place all the same.

    Args:
        h_re, h_im: the state's real and imaginary parts, shape (B, *S); overwritten.
        decay: complex, broadcastable to (B, *S).
        u_re, u_im: the input's real and imaginary parts, broadcastable to (B, *S).

    Returns:
        The new state's real and imaginary parts in the computation's dtype, before they
        are rounded to the state's dtype (the same tensors' values when the dtypes agree).
    """
    new_re = torch.addcmul(u_re, decay.real, h_re).addcmul_(decay.imag, h_im, value=-1)
    new_im = torch.addcmul(u_im, decay.real, h_im).addcmul_(decay.imag, h_re)
    h_re.copy_(new_re)
    h_im.copy_(new_im)
    return new_re, new_im


def powers_from_log(log_decay: Tensor, length: int) -> Tensor:
    """decay^l = exp(l * log_decay) for l = 0 .. length-1: the impulse response of h_t = decay h_{t-1} + u_t.

    Working from the logarithm keeps every power finite and differentiable even where
    decay^l underflows to zero, which repeated multiplication or `pow` would not.

    Args:
        log_decay: complex logarithm of the per-mode decay, shape (*S).
        length: number of powers.

    Returns:
        Complex tensor of shape (length, *S).
    """
    steps = torch.arange(length, device=log_decay.device, dtype=log_decay.real.dtype)
    return torch.exp(steps.view(length, *([1] * log_decay.dim())) * log_decay)


def upcast(param: Tensor) -> Tensor:
    """`param` in at least float32: as is in float32 or float64, else a float32 copy."""
    return param if param.dtype in _AT_LEAST_FLOAT32 else param.float()


def stacked_parameter(mixers: Sequence[nn.Module], name: str) -> Tensor:
    """The parameter `name` of every mixer, read through `upcast` and stacked over layers: (L, *shape). For one
    mixer, a view of the parameter itself where it needs no cast: never write into the result."""
    if len(mixers) == 1:
        return upcast(getattr(mixers[0], name)).unsqueeze(0)
    return torch.stack([upcast(getattr(m, name)) for m in mixers])


def eigenvalues_from_log(real_log: Tensor, imag: Tensor) -> Tensor:
    """Lambda = -exp(real_log) + i imag, complex, of the parameters' shape: stable for every parameter value."""
    return torch.complex(-torch.exp(real_log), imag)


def stacked_eigenvalues(mixers: Sequence[nn.Module], real_log: str, imag: str) -> Tensor:
    """`eigenvalues_from_log` of the parameters named `real_log` and `imag` of every mixer, stacked: (L, *shape)."""
    return eigenvalues_from_log(stacked_parameter(mixers, real_log), stacked_parameter(mixers, imag))


def working_precision(reference: Tensor, x: Tensor, dt: Tensor | None) -> tuple[Tensor, Tensor | None, torch.dtype]:
    """Cast x and dt to the computation's dtype, and say which dtype the output takes.

    The LTI mixers compute in the dtype of the parameter `reference` promoted to at least
    float32, with autocast disabled: the complex half types lack most kernels (and
    bfloat16 has no complex kind at all), and a long recurrence needs a float32 mantissa
    anyway. So half-precision parameters are upcast where they are read (`upcast`), and
    inputs that arrive in a lower precision (from an autocast region) or as float64 event
    times are brought to that dtype; casts to the same dtype cost nothing.

    Returns:
        x and dt in the computation's dtype, and the output's dtype: the input's dtype,
        or the parameters' where that is wider (float32 under autocast for a float32
        model, as without autocast).
    """
    dtype = reference.dtype if reference.dtype in _AT_LEAST_FLOAT32 else torch.float32
    out_dtype = torch.promote_types(x.dtype, reference.dtype)
    return x.to(dtype), None if dt is None else dt.to(dtype), out_dtype
