"""`SequenceModel`: a deep residual stack of mixers with one capturable `step`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnn_lightning.models.mixer import Mixer, State, state_placement
from lrnn_lightning.models.step_ops import gated_linear_step, linear_step
from lrnn_lightning.models.validation import (
    check_dt,
    check_positive_int,
    check_sequence,
    check_state_rows,
    check_step_dt,
    check_step_input,
    dt_values_checked,
)


class GatedMLP(nn.Module):
    """Position-wise GeGLU: (B, ..., D) -> (B, ..., D)."""

    def __init__(self, d_model: int, expand: int = 2):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * expand * d_model)
        self.down = nn.Linear(expand * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(value * F.gelu(gate))

    def step(self, x_t: Tensor, norm: nn.LayerNorm, residual: Tensor) -> Tensor:
        """residual + self(norm(x_t)) for one step, x_t (B, D): two kernels on a GPU (see step_ops)."""
        return linear_step(gated_linear_step(x_t, self.up, norm=norm), self.down, residual=residual)


class ResidualBlock(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then + MLP(norm(.)), dropout on each branch."""

    def __init__(self, mixer: Mixer, d_model: int, mlp_expand: int = 2, dropout: float = 0.0):
        super().__init__()
        self.mixer_norm = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = GatedMLP(d_model, mlp_expand)
        self.dropout = nn.Dropout(dropout)

    def _mlp_branch(self, h: Tensor) -> Tensor:
        return h + self.dropout(self.mlp(self.mlp_norm(h)))

    def forward(self, x: Tensor, dt: Tensor | None = None) -> Tensor:
        return self._mlp_branch(x + self.dropout(self.mixer(self.mixer_norm(x), dt)))

    def prefill(self, x: Tensor, dt: Tensor | None = None) -> tuple[Tensor, State]:
        y, state = self.mixer.prefill(self.mixer_norm(x), dt)
        return self._mlp_branch(x + self.dropout(y)), state

    def step(self, x_t: Tensor, state: State, dt_t: Tensor | None = None) -> Tensor:
        h = x_t + self.dropout(self.mixer.step(self.mixer_norm(x_t), state, dt_t))
        if self.training and self.dropout.p > 0:
            return self._mlp_branch(h)
        return self.mlp.step(h, self.mlp_norm, h)  # _mlp_branch without dropout


class SequenceModel(nn.Module):
    """Input projection -> `n_layers` residual mixer blocks -> norm -> output projection.

    Implements the step protocol over all layers, so a whole deep model's step is one
    capturable call. State keys are `"<layer>.<mixer key>"`.

    Args:
        mixer: registry name (`lru`, `s4d`, `s5`, `mamba`, `rglru`) or a Mixer class.
        d_input: features per input step.
        d_output: features per output step (equal to `d_input` for autoregressive rollouts).
        d_model: width of the residual stream.
        d_state: state size of each mixer (its meaning is the mixer's own).
        n_layers: number of residual blocks.
        dropout: dropout on each residual branch (inactive in `step` under `eval()`).
        mlp_expand: hidden width of the gated MLP, as a multiple of `d_model`.
        mixer_kwargs: extra options for the mixer's constructor.

    Example:
        >>> model = SequenceModel("lru", d_input=3, d_output=3, d_model=32, d_state=16, n_layers=2)
        >>> y = model(torch.randn(4, 100, 3))                      # (4, 100, 3)
        >>> state = model.allocate_state(4, "cpu", torch.float32)
        >>> y_t = model.step(torch.randn(4, 3), state)              # (4, 3)
    """

    def __init__(self, mixer: str | type[Mixer], d_input: int, d_output: int, d_model: int = 64,
                 d_state: int = 32, n_layers: int = 2, dropout: float = 0.0, mlp_expand: int = 2,
                 mixer_kwargs: dict | None = None):
        super().__init__()
        from lrnn_lightning.models.registry import check_mixer_options, get_mixer_class

        for name, value in (("d_input", d_input), ("d_output", d_output), ("d_model", d_model),
                            ("d_state", d_state), ("n_layers", n_layers), ("mlp_expand", mlp_expand)):
            check_positive_int(value, name, "SequenceModel")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"SequenceModel: dropout must lie in [0, 1), got {dropout!r}.")
        mixer_cls = get_mixer_class(mixer) if isinstance(mixer, str) else mixer
        check_mixer_options(mixer_cls, mixer_kwargs or {})
        self.mixer_name = mixer if isinstance(mixer, str) else mixer_cls.__name__
        self.d_input, self.d_output, self.d_model = d_input, d_output, d_model
        self.encoder = nn.Linear(d_input, d_model)
        self.layers = nn.ModuleList(
            ResidualBlock(mixer_cls(d_model, d_state, **(mixer_kwargs or {})), d_model, mlp_expand, dropout)
            for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, d_output)

    def forward(self, x: Tensor, dt: Tensor | None = None) -> Tensor:
        """x (B, L, d_input), dt (B, L) or None -> (B, L, d_output).

        dt's values are checked once here, not again in every layer.
        """
        batch, length = check_sequence(x, self.d_input, "SequenceModel")
        check_dt(dt, batch, length, "SequenceModel")
        h = self.encoder(x)
        with dt_values_checked(dt):
            for layer in self.layers:
                h = layer(h, dt)
        return self.decoder(self.final_norm(h))

    def allocate_state(self, batch_size: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> State:
        """Zeroed state of every layer, keys `"<layer>.<name>"`, on `device` in `dtype` (None: the model's
        parameters', `mixer.state_placement`)."""
        device, dtype = state_placement(self, device, dtype)
        state: State = {}
        for i, layer in enumerate(self.layers):
            for key, tensor in layer.mixer.allocate_state(batch_size, device, dtype).items():
                state[f"{i}.{key}"] = tensor
        return state

    def _layer_state(self, state: State, i: int, batch: int) -> State:
        prefix = f"{i}."
        layer = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if not layer:  # e.g. a bare mixer's state, or another model's: say so rather than a KeyError deep inside
            raise ValueError(f"SequenceModel.step: the state has no entries of layer {i} (keys '{i}.<name>'); its keys "
                             f"are {sorted(state)[:6]}. HINT: make it with this model's allocate_state or prefill.")
        check_state_rows(layer, batch, "SequenceModel", prefix)  # names the layer; its mixer checks again, bare
        return layer

    def step(self, x_t: Tensor, state: State, dt_t: Tensor | None = None) -> Tensor:
        """x_t (B, d_input), dt_t (B,) or None -> (B, d_output); `state` updated in place."""
        batch = check_step_input(x_t, self.d_input, "SequenceModel")
        check_step_dt(dt_t, batch, "SequenceModel")
        h = linear_step(x_t, self.encoder)
        for i, layer in enumerate(self.layers):
            h = layer.step(h, self._layer_state(state, i, batch), dt_t)
        return linear_step(h, self.decoder, norm=self.final_norm)

    def prefill(self, x: Tensor, dt: Tensor | None = None) -> tuple[Tensor, State]:
        """Parallel pass over a context: x (B, L, d_input) -> (y (B, L, d_output), final state)."""
        batch, length = check_sequence(x, self.d_input, "SequenceModel")
        check_dt(dt, batch, length, "SequenceModel")
        h = self.encoder(x)
        state: State = {}
        with dt_values_checked(dt):
            for i, layer in enumerate(self.layers):
                h, layer_state = layer.prefill(h, dt)
                state.update({f"{i}.{key}": value for key, value in layer_state.items()})
        return self.decoder(self.final_norm(h)), state
