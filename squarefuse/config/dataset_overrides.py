"""A checkpoint's stored dataset config with an app's dataset overrides applied (eval, predict, extract).

The stored config is the training run's, resolved; `merge_dataset_overrides` applies the non-null
overrides of the app's `dataset` block, moves paths under an overridden `root`, and gives keys the
checkpoint predates their dataset/base.yaml defaults (package data: squarefuse/config/defaults/).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import PurePath
from typing import Any

from omegaconf import DictConfig, OmegaConf

from squarefuse.config.stored_config import literal_config

log = logging.getLogger(__name__)


# The keys every dataset config has, with their defaults; package data, so that an installed
# squarefuse (not only a source checkout) reads the same file as the training configs.
DATASET_BASE_CONFIG = resources.files("squarefuse.config.defaults") / "dataset" / "base.yaml"


def dataset_defaults() -> DictConfig:
    """The keys every dataset config has, with their defaults, as the package ships them."""
    return OmegaConf.create(DATASET_BASE_CONFIG.read_text())


def _keys_added_since(stored: DictConfig) -> dict[str, Any]:
    """Default values of the dataset keys a checkpoint's config predates (added to base.yaml later).

    Interpolated and required (`???`) defaults are left out: every checkpoint has those keys.
    """
    base = dataset_defaults()
    return {
        key: base[key]
        for key in base
        if key not in stored and not OmegaConf.is_interpolation(base, key) and not OmegaConf.is_missing(base, key)
    }


def merge_dataset_overrides(
    stored: Mapping[str, Any], overrides: Mapping[str, Any] | None, *, allow_new: tuple[str, ...] = ()
) -> DictConfig:
    """The checkpoint's dataset config with the non-null eval overrides applied.

    The stored config is resolved (an interpolation in it is refused, never resolved:
    `literal_config`), so paths the training config derived from `root`
    (`${dataset.root}/val.txt`...) hold the old root: when `root` is overridden, every top-level
    string that lies under the old root is moved under the new one (an explicit override of such
    a key still wins).

    Args:
        stored: the dataset config stored in the checkpoint.
        overrides: the eval config's `dataset` block (null values keep the stored value).
        allow_new: top-level keys that may be added although the stored config lacks them (the
            annotation file of a split the training run did not use, e.g. `test_file`).

    A key the checkpoint predates (added to dataset/base.yaml since) gets its default, and
    the log says so, so that older checkpoints keep working.

    Raises:
        ValueError: an override names a key the stored dataset config does not have, or a stored
            value is an interpolation.
    """
    merged = literal_config(dict(stored), prefix="dataset")
    added = _keys_added_since(merged)
    if added:
        log.info("the checkpoint's dataset config predates %s: using the defaults %s", sorted(added), added)
        merged = OmegaConf.merge(merged, added)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "root" in overrides and "root" in merged and merged.root is not None:
        old_root, new_root = PurePath(str(merged.root)), PurePath(str(overrides["root"]))
        for key, value in merged.items():
            if key != "root" and isinstance(value, str):
                try:
                    merged[key] = str(new_root / PurePath(value).relative_to(old_root))
                except ValueError:  # not under the old root: an explicit path, kept
                    pass
    for key in allow_new:
        if key in overrides and key not in merged:
            merged[key] = overrides[key]
    _apply_overrides(merged, overrides, prefix="dataset")
    return merged


def _apply_overrides(node: DictConfig, overrides: Mapping[str, Any], *, prefix: str) -> None:
    for key, value in overrides.items():
        if key not in node:
            raise ValueError(
                f"{prefix}.{key}={value} overrides a key the checkpoint's dataset config does not have "
                f"(keys of {prefix}: {', '.join(sorted(str(k) for k in node))})"
            )
        if isinstance(value, Mapping) and isinstance(node[key], Mapping):
            # `+dataset.generate.seed=1` changes one key of the block, not the whole block.
            _apply_overrides(node[key], value, prefix=f"{prefix}.{key}")
        else:
            node[key] = value
