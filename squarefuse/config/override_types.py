"""Command-line values of the wrong type fail at start-up, with the key, before any work is done.

Hydra parses ``trainer.batch_size=abc`` as a string and ``trainer.epochs=1.5`` as a float and
composes them without complaint; the mistake would surface much later as ``invalid literal for
int()`` without the key, or not at all (``int(1.5)`` is 1). The config files define each key's
type by its default, so every command-line value is checked against the value the same config
(the same group choices) has without the command-line values.
"""

from __future__ import annotations

from typing import Any

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def _type_error(value: Any, default: Any) -> str | None:
    """What is wrong with ``value`` where the config files have ``default``, or None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None  # strings, null defaults and containers are checked where they are used


def check_override_types(cfg: DictConfig, config_name: str) -> None:
    """Raises ValueError naming the first command-line ``key=value`` whose type is not the key's type.

    Call from inside a Hydra app (it reads the overrides and group choices from HydraConfig).
    """
    if not GlobalHydra.instance().is_initialized():
        return
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices.items()
    groups = [f"{group}={choice}" for group, choice in choices if choice is not None and not group.startswith("hydra")]
    reference = compose(config_name, overrides=groups)
    for override in hydra_cfg.overrides.task:
        key, sep, _ = override.lstrip("+~").partition("=")
        if not sep:
            continue
        default = OmegaConf.select(reference, key, default=None, throw_on_resolution_failure=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        wanted = _type_error(value, default)
        if wanted is not None:
            raise ValueError(f"{key}={value!r}: must be {wanted}, like its default {default!r} (from `{override}`)")
