"""Depthwise causal 1-D convolution with a rolling-window step, shared by Mamba and RG-LRU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnn_lightning.models.validation import check_positive_int


class CausalConv1d(nn.Module):
    """Per-channel causal convolution over time: y_t = bias + sum_k w_k * x_{t-K+1+k}.

    The parallel path pads the sequence with K-1 zeros on the left. The step path keeps
    the last K-1 inputs in a window of shape (B, channels, K-1), oldest first, which it
    shifts in place; `final_window` gives the same window after a whole sequence.

    Args:
        channels: number of channels C (each has its own kernel).
        kernel_size: taps K >= 1; K = 1 is a per-channel affine map with an empty window.

    Example:
        >>> conv = CausalConv1d(8, 4)
        >>> y = conv(torch.randn(2, 10, 8))                   # (2, 10, 8)
        >>> window = conv.allocate_window(2, "cpu", torch.float32)
        >>> y_t = conv.step(torch.randn(2, 8), window)        # (2, 8)
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        check_positive_int(channels, "channels", "CausalConv1d")
        check_positive_int(kernel_size, "kernel_size", "CausalConv1d")
        self.channels, self.kernel_size = channels, kernel_size
        # same init as nn.Conv1d(groups=channels): fan_in = kernel_size
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = nn.Parameter(torch.empty(channels, kernel_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, C) -> (B, L, C), starting from a zero window."""
        padded = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))
        return F.conv1d(padded, self.weight.unsqueeze(1), self.bias, groups=self.channels).transpose(1, 2)

    def allocate_window(self, batch_size: int, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
        """Zeroed step window of shape (B, C, K-1)."""
        return torch.zeros(batch_size, self.channels, self.kernel_size - 1, device=device, dtype=dtype)

    def final_window(self, x: Tensor) -> Tensor:
        """The step window after consuming x (B, L, C): its last K-1 inputs as (B, C, K-1),
        zero-padded on the left (oldest side) when L < K-1."""
        keep = self.kernel_size - 1
        tail = x[:, max(x.shape[1] - keep, 0):].transpose(1, 2)
        return F.pad(tail, (keep - tail.shape[-1], 0)).contiguous()

    def step(self, x_t: Tensor, window: Tensor) -> Tensor:
        """x_t (B, C) -> (B, C); `window` (B, C, K-1) is shifted in place to end with x_t.

        Three kernels: the taps [window, x_t], the forward's convolution over them (one
        output position), and the in-place roll of the window (none for K = 1).
        """
        taps = torch.cat([window, x_t.unsqueeze(-1)], dim=-1)
        y = F.conv1d(taps, self.weight.unsqueeze(1), self.bias, groups=self.channels).squeeze(-1)
        if self.kernel_size > 1:
            window.copy_(taps[..., 1:])
        return y
