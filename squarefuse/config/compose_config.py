"""Compose one of the repository's app configs (`configs/<name>.yaml`) from inside another app.

`scripts/cache_tokens.py train=[...]` needs the config `python train.py ...` would run with. Inside
a Hydra app the global Hydra is initialised with the same `configs/` folder; from a plain call
(a test, a notebook) it is initialised here for the duration of the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

__all__ = ["CONFIG_DIR", "compose_app_config"]

# The configs/ folder next to the package: apps run from a checkout (or an editable install) of the repository.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def compose_app_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """`configs/<config_name>.yaml` with command-line style overrides (`group=option`, `key=value`).

    Raises:
        ValueError: an override names no key or option (Hydra's message, which names it).
    """
    from hydra.errors import ConfigCompositionException, OverrideParseException  # noqa: PLC0415

    overrides = [str(o) for o in overrides]
    try:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name=config_name, overrides=overrides)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    except (ConfigCompositionException, OverrideParseException) as e:
        raise ValueError(f"{config_name} config with overrides {overrides}: {e}") from e
