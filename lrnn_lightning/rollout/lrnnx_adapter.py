"""`LrnnxAdapter`: runs a model written to lrnnx's inference protocol through this package's step protocol.

lrnnx's protocol:
    allocate_inference_cache(batch_size, max_seqlen) -> dict   (state tensors, maybe other entries)
    step(x, cache, integration_timesteps=dt) -> (y, cache)      x (B, H) for LTI models, (B, 1, H) for LTV
The returned cache may hold new tensors instead of updating the old ones. A CUDA graph
needs fixed addresses, so the adapter copies every returned state tensor into the tensor
`allocate_state` handed out, in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lrnn_lightning.models.mixer import state_placement
from lrnn_lightning.rollout.state import State


def _is_ltv(model: nn.Module) -> bool:
    # lrnnx's time-varying models derive from a class named LTV_LRNN; lrnnx itself is not a dependency
    return any(cls.__name__ == "LTV_LRNN" for cls in type(model).__mro__)


class LrnnxAdapter(nn.Module):
    """Wrap an lrnnx-protocol model so that `RolloutEngine`, `capture_graph` and `generate` can run it.

    Tensor entries of the inference cache become the state; other entries (e.g. an int
    offset) are passed to every `step` unchanged. lrnnx has no parallel prefill, so
    `prefill` and `forward` run the step loop over the sequence.

    Args:
        model: has `allocate_inference_cache(batch_size, max_seqlen)` and `step(x, cache, **kw) -> (y, cache)`.
        ltv: whether `step` takes and returns (B, 1, H) (lrnnx's LTV models); None detects a
            subclass of a class named `LTV_LRNN`.
        max_seqlen: passed to `allocate_inference_cache`.
        dt_kwarg: keyword under which `step` takes the (B, 1) timesteps.
        d_model: the model's width H, if known (lets the engine check inputs before running).

    Example:
        >>> engine = RolloutEngine(LrnnxAdapter(lrnnx_model, d_model=64).cuda(), event_mode=True)
        >>> future = engine.rollout(context, horizon=100, dt=dt)
    """

    def __init__(self, model: nn.Module, *, ltv: bool | None = None, max_seqlen: int = 1,
                 dt_kwarg: str = "integration_timesteps", d_model: int | None = None):
        super().__init__()
        for name in ("allocate_inference_cache", "step"):
            if not callable(getattr(model, name, None)):
                raise ValueError(f"LrnnxAdapter: {type(model).__name__} has no {name}(). HINT: the adapter is for "
                                 "models with lrnnx's allocate_inference_cache/step protocol; models with "
                                 "allocate_state/step/prefill need no adapter.")
        self.model = model
        self.ltv = _is_ltv(model) if ltv is None else bool(ltv)
        self.max_seqlen, self.dt_kwarg = max_seqlen, dt_kwarg
        if d_model is not None:
            self.d_input = self.d_output = d_model
        self._extras: dict[str, Any] = {}

    def allocate_state(self, batch_size: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> State:
        """The cache's tensors for `batch_size` rows, zeroed, on `device`; real floating ones in `dtype` (None: the
        wrapped model's parameters', `state_placement`)."""
        device, dtype = state_placement(self.model, device, dtype)
        state: State = {}
        for key, value in self.model.allocate_inference_cache(batch_size, self.max_seqlen).items():
            if isinstance(value, Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
                state[key] = value.clone().zero_()
            else:
                self._extras[key] = value
        return state

    def step(self, x_t: Tensor, state: State, dt_t: Tensor | None = None) -> Tensor:
        """x_t (B, H), dt_t (B,) or None -> (B, H); `state` updated in place."""
        batch = x_t.shape[0]
        kwargs = {} if dt_t is None else {self.dt_kwarg: dt_t.reshape(batch, 1)}
        y, cache = self.model.step(x_t.unsqueeze(1) if self.ltv else x_t, {**self._extras, **state}, **kwargs)
        for key, buffer in state.items():
            if key not in cache:
                raise ValueError(f"LrnnxAdapter: {type(self.model).__name__}.step returned a cache without {key!r}. "
                                 "HINT: step must return every state entry of allocate_inference_cache.")
            if cache[key] is not buffer:
                buffer.copy_(cache[key])
        return y.reshape(batch, -1)

    def prefill(self, x: Tensor, dt: Tensor | None = None) -> tuple[Tensor, State]:
        """x (B, L, H), dt (B, L) or None -> (y (B, L, H), state after step L), by the step loop."""
        state = self.allocate_state(x.shape[0], x.device, x.dtype)
        outputs = [self.step(x[:, t], state, None if dt is None else dt[:, t]) for t in range(x.shape[1])]
        return torch.stack(outputs, dim=1), state

    def forward(self, x: Tensor, dt: Tensor | None = None) -> Tensor:
        """x (B, L, H), dt (B, L) or None -> (B, L, H), by the step loop."""
        return self.prefill(x, dt)[0]
