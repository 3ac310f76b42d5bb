"""`KernelCall`: one launch of a fused kernel, assembled (`launch.build_call`) and ready to run or capture."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class KernelCall:
    """One launch of the fused kernel, ready to go: grid, arguments, constexprs and the buffers to read back."""

    kernel: str
    grid: tuple[int]
    args: tuple
    constexprs: dict
    num_warps: int
    out: Tensor
    states: Tensor
    cooperative: bool = False  # programs wait for each other (a split or phased step): all must be resident
    zeroed: tuple[Tensor, ...] = ()  # zeroed before every launch: exchange slots and barrier counters
    num_stages: int = 1  # Triton's software pipelining of loops (the register kernel's loops stream no tiles)

    def launch(self, kernels) -> None:
        """Launch it from the kernel module `kernels` (`kernel_module()`). Launching one call again is
        correct: the exchange slots are zeroed first, since tags restart at every launch (kernels/group.py)."""
        for tensor in self.zeroed:
            tensor.zero_()
        options = {"launch_cooperative_grid": True} if self.cooperative else {}
        getattr(kernels, self.kernel)[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                                                 num_stages=self.num_stages, **options)
