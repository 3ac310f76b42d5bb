"""`ComplexStateMixer`: the step-protocol scaffolding of the diagonal complex SSMs (LRU, S5, S4D).

Their state is complex, kept as a real pair {"h_re", "h_im"} of one shape per mixer, and
their step runs with autocast off in the parameters' dtype promoted to at least float32
(`working_precision`). This base owns that part of the protocol: `allocate_state`, the
checks and precision handling around `step`, and turning a prefill's last complex state
into the state dict. A subclass gives the state's shape and the step's arithmetic.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from lrnn_lightning.models.lti_complex import working_precision
from lrnn_lightning.models.mixer import Mixer, State, state_placement
from lrnn_lightning.models.validation import check_state_rows, check_step_dt, check_step_input


class ComplexStateMixer(Mixer):
    """Base of mixers whose state is complex and held as {"h_re", "h_im"} real tensors.

    Subclasses set `self.d_model` and a parameter `self.D` (H,) (its dtype sets the working
    precision) and implement `_state_shape` and `_complex_step`.
    """

    D: nn.Parameter

    @property
    def _owner(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def _state_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of each of h_re and h_im for `batch_size` rows."""

    @abc.abstractmethod
    def _complex_step(self, x_t: Tensor, state: State, dt_t: Tensor | None) -> Tensor:
        """The step's arithmetic in working precision: x_t (B, H), dt_t (B,) or None -> y_t (B, H);
        updates state["h_re"], state["h_im"] in place."""

    def allocate_state(self, batch_size: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> State:
        """Zeroed state {"h_re", "h_im"}, each of `_state_shape(batch_size)`."""
        device, dtype = state_placement(self, device, dtype)
        shape = self._state_shape(batch_size)
        return {"h_re": torch.zeros(shape, device=device, dtype=dtype),
                "h_im": torch.zeros(shape, device=device, dtype=dtype)}

    def step(self, x_t: Tensor, state: State, dt_t: Tensor | None = None) -> Tensor:
        """One recurrent step; `state` is updated in place.

        Args:
            x_t: input, shape (B, H).
            state: as returned by `allocate_state` or `prefill`, in the parameters' dtype or a
                narrower floating one (the step computes in at least float32 and rounds into it).
            dt_t: optional timestep, shape (B,) or (B, 1).

        Returns:
            y_t of shape (B, H), in x_t's dtype or the parameters' where that is wider.
        """
        batch = check_step_input(x_t, self.d_model, self._owner)
        check_step_dt(dt_t, batch, self._owner)
        check_state_rows(state, batch, self._owner)
        with torch.autocast(x_t.device.type, enabled=False):
            x_t, dt_t, out_dtype = working_precision(self.D, x_t, None if dt_t is None else dt_t.reshape(batch))
            return self._complex_step(x_t, state, dt_t).to(out_dtype)

    @staticmethod
    def _state_from(h_last: Tensor, dtype: torch.dtype) -> State:
        """The state dict for a complex last state (from a parallel pass), in `dtype`."""
        return {"h_re": h_last.real.to(dtype).contiguous(), "h_im": h_last.imag.to(dtype).contiguous()}
