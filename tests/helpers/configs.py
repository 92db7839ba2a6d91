"""Compose the real training config with tiny settings for fast CPU tests."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig

from squarefuse.config.compose_config import CONFIG_DIR


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """The config Hydra composes from configs/; the test may change its own copy freely.

    Composing takes 0.3-1 s on 2 cores (Hydra reads and merges ~20 yaml files), and the tests
    compose a few dozen group selections with many different values (each module has its own
    ``dataset.root``). So the group selections (``fusion=none``, ``experiment=...``) are composed
    once per session and copied, and the value overrides (``trainer.epochs=1``, ``+key=v``,
    ``~key``) are applied to the copy by the function Hydra's compose applies them with, after the
    defaults list, in the same order: the result and the errors are Hydra's own.
    """
    groups, values = [], []
    for override in OverridesParser.create().parse_overrides(overrides):
        (values if _is_value_override(override) else groups).append(override)
    cfg = copy.deepcopy(_compose_once(config_name, tuple(o.input_line for o in groups)))
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    return cfg


def _is_value_override(override: Override) -> bool:
    """What Hydra's defaults list would hand to ``_apply_overrides_to_config`` (not a config group)."""
    key = override.key_or_group
    is_group = (CONFIG_DIR / key).is_dir() or key.split("/")[0] == "hydra"
    return not (is_group or override.is_sweep_override() or override.package is not None)


@functools.cache
def _compose_once(config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@contextlib.contextmanager
def as_hydra_app(config_name: str, overrides: list[str]) -> Iterator[DictConfig]:
    """The config as `@hydra.main` hands it to an app, HydraConfig set: for checks that read the command line."""
    # Here, not at the top: conftest.py imports this module, and pytest-xdist's controller, which
    # runs no test, should not import torch (the resolvers read the distributed rank).
    from squarefuse.config.resolvers import register_resolvers  # noqa: PLC0415

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            yield cfg
        finally:
            HydraConfig.instance().cfg = None


def tiny_overrides(data_root: Path) -> list[str]:
    """A 2-block ViT at 32 px on a small synthetic set: a few seconds per epoch on 2 cores."""
    return [
        f"dataset.root={data_root}",
        "dataset.generate.train_per_class=2",
        "dataset.generate.val_per_class=1",
        "dataset.generate.test_per_class=1",
        "dataset.generate.size=64",  # decord cannot decode frames narrower than 64 px
        "dataset.num_frames=4",
        "backbone.img_size=32",
        "backbone.model_kwargs.depth=2",
        "backbone.model_kwargs.embed_dim=48",
        "fusion.K=4",
        *tiny_trainer_overrides(batch_size=4),
    ]


def tiny_trainer_overrides(*, batch_size: int) -> list[str]:
    """Two epochs on the CPU in fp32 in the main process, logging and validating every step/epoch."""
    return [
        f"trainer.batch_size={batch_size}",
        "trainer.num_workers=0",
        "trainer.epochs=2",
        "trainer.log_every=1",
        "trainer.val_every=1",
        "trainer.device=cpu",
        "trainer.precision=fp32",
    ]


def tiny_train_config(data_root: Path, *extra: str) -> DictConfig:
    return compose_config("train", tiny_overrides(data_root) + list(extra))


def fusion_config(option: str, *overrides: str) -> DictConfig:
    """The ``fusion`` group option ``option`` as Hydra composes it, with ``fusion.<key>=value`` overrides."""
    return compose_config("train", [f"fusion={option}", *(f"fusion.{o}" for o in overrides)]).fusion


def backbone_config(option: str) -> DictConfig:
    """The ``backbone`` group option ``option`` as Hydra composes it (with configs/backbone/base.yaml)."""
    return compose_config("train", [f"backbone={option}"]).backbone
