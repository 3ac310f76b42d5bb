"""Mixers by name, and `build_model` to make a `SequenceModel` from one."""

from __future__ import annotations

import importlib
import inspect

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

    mixer_cls = get_mixer_class(name)  # fail early with the list of valid names
    own = [name for name in inspect.signature(SequenceModel).parameters if name not in ("mixer", "d_input", "d_output")]
    unknown = sorted(set(kwargs) - set(own))
    if unknown:
        mixer_options = set(mixer_options_of(mixer_cls))
        owned = [key for key in unknown if key in mixer_options]
        hint = (f"HINT: {mixer_cls.__name__}'s own options go in mixer_kwargs, e.g. mixer_kwargs="
                f"{ {key: kwargs[key] for key in owned} } (model.mixer_kwargs in the config)." if owned else
                f"HINT: SequenceModel takes {', '.join(own)}; "
                f"{mixer_cls.__name__} takes {', '.join(mixer_options_of(mixer_cls)) or 'no options'}.")
        raise ValueError(f"build_model: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for a "
                         f"{name} model. {hint}")
    return SequenceModel(name, d_input=d_input, d_output=d_input if d_output is None else d_output, **kwargs)


def mixer_options_of(mixer_cls: type) -> list[str]:
    """The keyword options a mixer class takes besides (d_model, d_state), in order."""
    parameters = list(inspect.signature(mixer_cls).parameters.values())
    return [p.name for p in parameters if p.name not in ("d_model", "d_state")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_mixer_options(mixer_cls: type, options: dict) -> None:
    """Raise, naming the valid ones, for options (`mixer_kwargs`) the mixer class does not take."""
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(mixer_cls).parameters.values()):
        return  # a mixer that takes any option checks its own
    valid = mixer_options_of(mixer_cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"SequenceModel: {mixer_cls.__name__} takes no option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)} (mixer_kwargs). Its options: {', '.join(valid) or 'none'}. HINT: "
                         "d_state is SequenceModel's own argument; check the spelling.")
