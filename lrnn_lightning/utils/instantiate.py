"""Build callbacks and loggers from their Hydra config groups (a dict of `_target_` configs each), and check a
`_target_` config's keys against what its target takes, and a settings group's keys against their uses."""

from __future__ import annotations

import difflib
import inspect
import re

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf


def _instantiate_group(cfg: DictConfig | None, group: str, kind: type) -> list:
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"The `{group}` config must be a mapping of name -> object config, got {type(cfg).__name__}.")
    objects = []
    for name, entry in cfg.items():
        if entry is None:  # switched off with e.g. `callbacks.model_checkpoint=null`
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"{group}.{name} has no `_target_`. HINT: every entry of the `{group}` group must be an "
                             "instantiable config, e.g. `{_target_: ..., ...}`.")
        obj = hydra.utils.instantiate(entry)
        if not isinstance(obj, kind):
            raise ValueError(f"{group}.{name} built a {type(obj).__name__}, not a {kind.__name__}.")
        objects.append(obj)
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Every callback in the `callbacks` group."""
    return _instantiate_group(cfg, "callbacks", Callback)


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Every logger in the `logger` group (empty for `logger=none`)."""
    return _instantiate_group(cfg, "logger", Logger)


def accepted_keys(target: object) -> set[str] | None:
    """The keyword arguments `target` (a class or a function) takes, or None when it takes any. A `**kwargs` of
    one of this package's classes is followed up its bases (our data modules pass theirs to WindowDataModule);
    elsewhere it may go anywhere, so it counts as taking any."""
    ours = isinstance(target, type) and target.__module__.startswith("lrnn_lightning.")
    if ours:
        functions = [vars(cls)["__init__"] for cls in target.__mro__
                     if "__init__" in vars(cls) and cls.__module__.startswith("lrnn_lightning.")]
    else:
        functions = [target]
    keys: set[str] = set()
    for function in functions:
        parameters = inspect.signature(function).parameters.values()
        keys |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return keys - {"self"}
    return None


def check_target_keys(cfg: DictConfig, group: str, passed: tuple[str, ...] = ()) -> None:
    """Raise, naming them, for keys of the `_target_` config `cfg` (the `group` config, e.g. "data") that its
    target does not take; `passed` are the keyword arguments the caller adds itself."""
    target = hydra.utils.get_object(cfg._target_)
    accepted = accepted_keys(target)
    if accepted is None:
        return
    unknown = sorted({str(key) for key in cfg if not str(key).startswith("_")} - accepted - set(passed))
    if unknown:
        name = getattr(target, "__name__", cfg._target_)
        smoke = "" if group != "data" else (
            " (experiment=smoke shrinks the generated data sets with data.num_series and data.num_samples; with "
            "data=sunspots or data=csv, add '~data.num_series' '~data.num_samples')")
        raise ValueError(f"{group}: {name} takes no {', '.join(unknown)} (it takes {', '.join(sorted(accepted))}). "
                         f"HINT: fix the spelling, or drop the key: an experiment config may have set it for another "
                         f"{group} config{smoke}.")


def close_match(word: str, choices) -> str | None:
    """The choice closest to a misspelt `word` (difflib), or None: what a "did you mean" hint names."""
    matches = difflib.get_close_matches(word, sorted(choices), n=1)
    return matches[0] if matches else None


def check_used_keys(cfg: DictConfig, group: str, known: set[str]) -> None:
    """Raise, naming them, for keys of the plain settings group `cfg.<group>` (e.g. "generation") that are not
    `known` and that nothing in the config reads (`${<group>.key}`, also through oc.select or brackets): a
    misspelt `+generation.horizn=8` would otherwise be ignored while the default horizon runs. A known key
    nobody reads (its reader overridden directly) is fine, and a config that reads none of the group (e.g.
    callbacks=none) is not checked."""
    settings = cfg.get(group)
    if not isinstance(settings, DictConfig):
        return
    rest = OmegaConf.to_container(cfg, resolve=False)
    rest.pop(group, None)
    used = set(re.findall(rf"\b{group}(?:\.|\[['\"]?)(\w+)", " ".join(re.findall(r"\$\{[^}]*\}", str(rest)))))
    unused = sorted(str(key) for key in settings if str(key) not in used | known)
    if not used or not unused:
        return
    guesses = [f"{key} -> {match}" for key in unused if (match := close_match(key, used | known))]
    raise ValueError(f"{group}: nothing reads {', '.join(f'{group}.{key}' for key in unused)} (the config reads "
                     f"{', '.join(sorted(used))}). HINT: fix the spelling"
                     f"{' (' + ', '.join(guesses) + ')' if guesses else ''}, or pass the setting where it is used.")
