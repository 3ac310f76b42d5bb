"""Complex arithmetic for the diagonal LTI mixers, with the state kept as real tensors.

The recurrent state of LRU, S4D and S5 is complex but is stored as a real pair
(h_re, h_im) so the rollout engine can zero, pad and copy it like any other state and
torch.compile sees only real tensors. The helpers here do the per-step complex updates
on such pairs with as few kernels as possible (each `addcmul` fuses a multiply and an
add), and build the powers that turn the recurrence into a convolution.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def complex_decay_add_(h_re: Tensor, h_im: Tensor, decay: Tensor, u_re: Tensor, u_im: Tensor) -> None:
    """h <- decay * h + u in place, for h = h_re + i h_im held as two real tensors; 6 kernels.

    Args:
        h_re, h_im: the state's real and imaginary parts, shape (B, *S); overwritten.
        decay: complex, broadcastable to (B, *S).
        u_re, u_im: the input's real and imaginary parts, broadcastable to (B, *S).
    """
    new_re = torch.addcmul(u_re, decay.real, h_re).addcmul_(decay.imag, h_im, value=-1)
    new_im = torch.addcmul(u_im, decay.real, h_im).addcmul_(decay.imag, h_re)
    h_re.copy_(new_re)
    h_im.copy_(new_im)


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


def working_precision(reference: Tensor, x: Tensor, dt: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Cast x and dt to the dtype of the parameter `reference`.

    The LTI mixers run with autocast disabled: complex tensors have no bfloat16 kind,
    and a long recurrence needs a float32 mantissa anyway. So inputs that arrive in a
    lower precision (from an autocast region) or as float64 event times are brought to
    the parameters' dtype; casts to the same dtype cost nothing.
    """
    return x.to(reference.dtype), None if dt is None else dt.to(reference.dtype)
