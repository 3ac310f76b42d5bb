"""Causal convolution along time through the FFT, for the time-invariant (dt=None) paths.

A linear time-invariant recurrence unrolls into a convolution with its impulse response,
y_t = sum_{j<=t} k_j u_{t-j}, which the FFT evaluates in O(L log L) for every channel at
once instead of L sequential steps.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fft_size(length: int) -> int:
    """Smallest power of two >= 2 * length - 1, so the circular convolution is not wrapped."""
    return 1 << max(2 * length - 2, 0).bit_length()


def causal_fft_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """Causal convolution of `u` with `kernel` along dim 1 of `u` (dim 0 of `kernel`).

    Real inputs use the real FFT; if either tensor is complex, the complex FFT is used.
    Half-precision inputs are computed in float32 (cuFFT supports few half sizes).

    Args:
        u: input, shape (B, L, *C), real or complex.
        kernel: impulse response, shape (K, *C) with K <= L, real or complex;
            `*C` must broadcast against `u`'s channel dims.

    Returns:
        y of shape (B, L, *C') with y[:, t] = sum_{j=0}^{min(t, K-1)} kernel[j] * u[:, t - j],
        where *C' is the broadcast of the channel dims; complex if either input is.

    Example:
        >>> y = causal_fft_conv(torch.randn(2, 100, 8), torch.randn(100, 8))  # (2, 100, 8)
    """
    length = u.shape[1]
    if kernel.shape[0] > length:
        raise ValueError(
            f"causal_fft_conv: kernel length {kernel.shape[0]} exceeds the sequence length {length}. "
            "HINT: truncate the kernel to the first L taps."
        )
    if u.dtype in (torch.float16, torch.bfloat16):
        u = u.float()
    if kernel.dtype in (torch.float16, torch.bfloat16):
        kernel = kernel.float()
    n = fft_size(length)
    if u.is_complex() or kernel.is_complex():
        spectrum = torch.fft.fft(u, n=n, dim=1) * torch.fft.fft(kernel, n=n, dim=0)
        return torch.fft.ifft(spectrum, n=n, dim=1)[:, :length]
    spectrum = torch.fft.rfft(u, n=n, dim=1) * torch.fft.rfft(kernel, n=n, dim=0)
    return torch.fft.irfft(spectrum, n=n, dim=1)[:, :length]
