"""Mixers by name, and `build_model` to make a `SequenceModel` from one."""

from __future__ import annotations

import importlib

from lrnn_lightning.models.mixer import Mixer

# name -> "module:Class"; imported lazily so one broken mixer cannot break the rest
MIXERS: dict[str, str] = {
    "lru": "lrnn_lightning.models.lru:LRU",
    "s4d": "lrnn_lightning.models.s4d:S4D",
    "s5": "lrnn_lightning.models.s5:S5",
    "mamba": "lrnn_lightning.models.mamba:Mamba",
    "rglru": "lrnn_lightning.models.rglru:RGLRU",
}


def get_mixer_class(name: str) -> type[Mixer]:
    """The mixer class registered under `name` (case-insensitive)."""
    key = str(name).lower()
    if key not in MIXERS:
        raise ValueError(f"Unknown mixer {name!r}. Valid names: {', '.join(sorted(MIXERS))}.")
    module_name, class_name = MIXERS[key].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(name: str, d_input: int, d_output: int | None = None, **kwargs):
    """Build a `SequenceModel` whose mixer is `name`; `d_output` defaults to `d_input`.

    Example:
        >>> model = build_model("s5", d_input=3, d_model=64, d_state=32, n_layers=4)
    """
    from lrnn_lightning.models.backbone import SequenceModel

    get_mixer_class(name)  # fail early with the list of valid names
    return SequenceModel(name, d_input=d_input, d_output=d_input if d_output is None else d_output, **kwargs)
