"""Command-line values of the wrong type, or of keys the app never reads, fail at start-up, with the key.

Hydra parses ``trainer.batch_size=abc`` as a string and ``trainer.epochs=1.5`` as a float and
composes them without complaint; the mistake would surface much later as ``invalid literal for
int()`` without the key, or not at all (``int(1.5)`` is 1). The config files define each key's
type by its default, so every command-line value is checked against the value the same config
(the same group choices) has without the command-line values.

The apps that read a checkpoint (eval.py, predict.py) build the model from the config stored in
it. Hydra lets ``+fusion.K=4`` add a key to their config all the same, and nothing reads it: the
evaluation would silently be of the stored model. `check_added_keys` refuses such keys.
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


def _reference(config_name: str) -> DictConfig:
    """The app's config with this run's group choices and without its command-line values (nor the
    groups the command line added with `+group=option`: the config files do not have them)."""
    hydra_cfg = HydraConfig.get()
    added = {override.lstrip("+").partition("=")[0] for override in hydra_cfg.overrides.task if override[0] == "+"}
    groups = [
        f"{group}={choice}"
        for group, choice in hydra_cfg.runtime.choices.items()
        if choice is not None and not group.startswith("hydra") and group.split("/")[0] not in added
    ]
    return compose(config_name, overrides=groups)


def check_added_keys(config_name: str, *, app: str, open_sections: tuple[str, ...] = ("dataset",)) -> None:
    """Raises ValueError naming the first command-line ``+key=value`` (or ``+group=option``) that adds a
    key the app's own config files lack, outside `open_sections` (whose new keys the app reads).

    For the apps that take the model from a checkpoint (see the module's docstring). Call from
    inside a Hydra app.
    """
    if not GlobalHydra.instance().is_initialized():
        return
    reference = _reference(config_name)
    for override in HydraConfig.get().overrides.task:
        if not override.startswith("+"):
            continue  # Hydra itself refuses `key=value` for a key the config lacks
        key = override.lstrip("+").partition("=")[0]
        absent = object()
        in_config_files = OmegaConf.select(reference, key, default=absent) is not absent
        if in_config_files or key.split(".")[0] in (*open_sections, "hydra"):
            continue
        raise ValueError(
            f"`{override}`: {app} builds the model from the config stored in the checkpoint (backbone, "
            f"fusion, head as trained), so {key} cannot be changed here and would be ignored; the keys "
            f"{app} takes are in configs/{config_name}.yaml (dataset keys: +dataset.KEY=VALUE)"
        )


def check_override_types(cfg: DictConfig, config_name: str) -> None:
    """Raises ValueError naming the first command-line ``key=value`` whose type is not the key's type.

    Call from inside a Hydra app (it reads the overrides and group choices from HydraConfig).
    """
    if not GlobalHydra.instance().is_initialized():
        return
    hydra_cfg = HydraConfig.get()
    reference = _reference(config_name)
    for override in hydra_cfg.overrides.task:
        key, sep, _ = override.lstrip("+~").partition("=")
        if not sep:
            continue
        default = OmegaConf.select(reference, key, default=None, throw_on_resolution_failure=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        wanted = _type_error(value, default)
        if wanted is not None:
            raise ValueError(f"{key}={value!r}: must be {wanted}, like its default {default!r} (from `{override}`)")
