"""Moving recurrent state between the model and fixed buffers, keyed by what `allocate_state` declared."""

from __future__ import annotations

from torch import Tensor

State = dict[str, Tensor]


def load_state(buffers: State, source: State | None, owner: str) -> None:
    """Overwrite `buffers` in place with `source`, or zero them when `source` is None.

    `source` may hold fewer rows than `buffers` (a padded batch): the rows beyond it are
    zeroed, so padding rows start from the same benign state on every rollout.

    Args:
        buffers: state tensors of shape (B, ...) as returned by `allocate_state`.
        source: a state with exactly the same keys, each of shape (b, ...) with b <= B.
        owner: the model's name, for error messages.
    """
    if source is None:
        for buffer in buffers.values():
            buffer.zero_()
        return
    if set(source) != set(buffers):
        raise ValueError(
            f"{owner}: prefill returned state keys {sorted(source)}, but allocate_state declares "
            f"{sorted(buffers)}. HINT: prefill must return the same state that allocate_state allocates."
        )
    for key, buffer in buffers.items():
        value = source[key]
        if value.shape[1:] != buffer.shape[1:] or value.shape[0] > buffer.shape[0]:
            raise ValueError(
                f"{owner}: prefill returned state {key!r} of shape {tuple(value.shape)}, expected "
                f"(b, {', '.join(map(str, buffer.shape[1:]))}) with b <= {buffer.shape[0]} to match "
                "allocate_state. "
                "HINT: prefill and allocate_state must agree on every state tensor's shape."
            )
        rows = value.shape[0]
        buffer[:rows].copy_(value)
        buffer[rows:].zero_()
