"""Dataset formats: each reads its own keys of a dataset config and returns a split's annotations.

`dataset.name` names the format; `find_format(name)` looks it up in `FORMATS`. A format knows which
keys it needs (its docstring lists them) and turns them into the arguments of its reader in
`squarefuse.datasets.annotations`; every value comes from the config (configs/dataset/*.yaml
hold the defaults), none is assumed here. A split's annotation file is the key ``{split}_file``
and its video folder ``{split}_video_dir`` when the config has one, else ``video_dir``: split
names are free, so these two are the only keys that may be absent.

A format also answers what the rest of the code asks of the data: whether its items are decoded
videos (`decodes_videos`: pixels to augment on the device and to mix with MixUp/CutMix), which
config values the data decides (`run_settings`: a token cache fixes the frames, the frame size and
the token layout the model is built for), and, for a format that reads its items itself, the
split's dataset (`open_split`). The token cache (`dataset=tokens`) is the format that is not videos.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squarefuse.datasets.annotations import (
    MAX_CLASSES,
    Annotations,
    VideoRecord,
    k400_class_names,
    list_num_classes,
    load_k400,
    load_list,
    load_ssv2,
    read_label_map,
)

if TYPE_CHECKING:
    from torch.utils.data import Dataset

__all__ = ["FORMATS", "DatasetFormat", "TokenCache", "find_format", "optional", "required"]


def optional(cfg: Mapping[str, Any], key: str) -> Any:
    """`cfg[key]`, which may be null; a ValueError naming the key when the config lacks it."""
    if key not in cfg:
        raise ValueError(f"dataset.{key} is missing from the config (dataset.name={cfg.get('name')!r})")
    return cfg[key]


def required(cfg: Mapping[str, Any], key: str) -> Any:
    """`cfg[key]`; a ValueError naming the key when it is missing or null."""
    value = optional(cfg, key)
    if value is None:
        raise ValueError(f"dataset.{key} is not set (dataset.name={cfg.get('name')!r})")
    return value


def split_file(cfg: Mapping[str, Any], split: str) -> Any:
    """The annotation file of `split` (``dataset.{split}_file``)."""
    if cfg.get(f"{split}_file") is None:
        raise ValueError(f"dataset.{split}_file is not set: dataset {cfg.get('name')!r} has no split {split!r}")
    return cfg[f"{split}_file"]


def split_video_dir(cfg: Mapping[str, Any], split: str) -> Any:
    """``dataset.{split}_video_dir`` if set, else ``dataset.video_dir`` (None when neither is)."""
    return cfg.get(f"{split}_video_dir") or cfg.get("video_dir")


def _required_video_dir(cfg: Mapping[str, Any], split: str) -> Any:
    video_dir = split_video_dir(cfg, split)
    if video_dir is None:
        raise ValueError(f"neither dataset.{split}_video_dir nor dataset.video_dir is set")
    return video_dir


def _label_map_or(cfg: Mapping[str, Any], names_from_train: Callable[[], list[str]]) -> list[str]:
    """Class names from ``dataset.label_map`` when set, else from `names_from_train()`."""
    label_map = optional(cfg, "label_map")
    return read_label_map(label_map) if label_map is not None else names_from_train()


class DatasetFormat(abc.ABC):
    """One dataset format: `load(cfg, split)` reads the split's records and class names."""

    name: str
    # Items are decoded video frames: pixels, which device augmentation and MixUp/CutMix change.
    decodes_videos = True

    @abc.abstractmethod
    def load(self, cfg: Mapping[str, Any], split: str) -> Annotations:
        """The records of `split` and the class names, from the keys of `cfg` this format owns."""

    def describe(self, cfg: Mapping[str, Any]) -> str:
        """The data, for a message."""
        return f"dataset={self.name}"

    def run_settings(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The values a run's config takes from the data, as {dotted config key: value}; none for videos."""
        return {}

    def open_split(
        self, cfg: Mapping[str, Any], split: str, *, views: bool, report_dir: str | Path | None
    ) -> Dataset | None:
        """The split's dataset when the format reads its items itself; None: `build_dataset` decodes
        the videos of `load`'s records."""
        return None


class SSv2(DatasetFormat):
    """Something-Something V2 json files. Keys: labels_file, {split}_file, video_dir, video_ext."""

    name = "ssv2"

    def load(self, cfg: Mapping[str, Any], split: str) -> Annotations:
        return load_ssv2(
            labels_file=required(cfg, "labels_file"),
            annotation_file=split_file(cfg, split),
            video_dir=_required_video_dir(cfg, split),
            video_ext=str(required(cfg, "video_ext")),
        )


class Kinetics(DatasetFormat):
    """Official Kinetics csv files. Keys: {split}_file, {split}_video_dir, video_ext, layout, label_map
    (null: the sorted labels of train_file)."""

    name = "k400"

    def load(self, cfg: Mapping[str, Any], split: str) -> Annotations:
        return load_k400(
            annotation_file=split_file(cfg, split),
            class_names=_label_map_or(cfg, lambda: k400_class_names(split_file(cfg, "train"))),
            video_dir=_required_video_dir(cfg, split),
            video_ext=str(required(cfg, "video_ext")),
            layout=str(required(cfg, "layout")),
        )


class PathLabelList(DatasetFormat):
    """ "path label" list files. Keys: {split}_file, video_dir (null: the list's folder), label_map
    (null: classes 0..num_classes-1), num_classes (null: 1 + the largest label of train_file)."""

    name = "list"

    def load(self, cfg: Mapping[str, Any], split: str) -> Annotations:
        def numbered() -> list[str]:
            given = optional(cfg, "num_classes")
            if given is not None and not 0 < int(given) <= MAX_CLASSES:
                raise ValueError(f"dataset.num_classes={given}: must be 1 to {MAX_CLASSES} (or null: from train_file)")
            count = given or list_num_classes(split_file(cfg, "train"))
            return [str(i) for i in range(int(count))]

        return load_list(
            list_file=split_file(cfg, split),
            video_dir=split_video_dir(cfg, split),
            class_names=_label_map_or(cfg, numbered),
        )


class Synthetic(DatasetFormat):
    """The built-in synthetic videos, generated under `root` on first use. Keys: root, task, generate
    (splits train, val, test). A config saved before `task` existed means the default task."""

    name = "synthetic"

    def load(self, cfg: Mapping[str, Any], split: str) -> Annotations:
        # Imported on use: only this format needs the generator.
        from squarefuse.datasets.synthetic import ensure_synthetic  # noqa: PLC0415

        generate = dict(required(cfg, "generate"))
        # A config saved before the task families (an older checkpoint) generated `direction`, without a
        # test split of its own: give it one the size of val.
        generate.setdefault("test_per_class", generate.get("val_per_class"))
        task = cfg["task"] if "task" in cfg else "direction"
        splits = ensure_synthetic(required(cfg, "root"), task=task, **generate)
        return load_list(list_file=splits.list_file(split), video_dir=splits.root, class_names=list(splits.class_names))


class TokenCache(DatasetFormat):
    """A token cache made by scripts/cache_tokens.py: per-frame backbone tokens, not videos
    (`squarefuse.datasets.token_cache`). Keys: root, and what the run expects of the cache (backbone,
    weights_hash, num_frames, img_size, tokens, task; null: whatever the cache holds)."""

    name = "tokens"
    decodes_videos = False

    def load(self, cfg: Mapping[str, Any], split: str) -> Annotations:
        # Imported on use: the cache's reader needs torch and numpy, which the decoding process must not load.
        from squarefuse.datasets.token_cache import read_cache_info, read_split_index  # noqa: PLC0415

        info = read_cache_info(required(cfg, "root"))
        index = read_split_index(required(cfg, "root"), split, num_classes=len(info["class_names"]))
        records = [VideoRecord(v["path"], int(v["label"]), v["id"]) for v in index["videos"]]
        return Annotations(records=records, class_names=list(info["class_names"]))

    def describe(self, cfg: Mapping[str, Any]) -> str:
        return f"the token cache {cfg.get('root')} (dataset.tokens={cfg.get('tokens')})"

    def run_settings(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The cache's frames, frame size, backbone and token layout (cache.json), after checking that
        the ones the run names match (`token_cache.cache_run_settings`)."""
        from squarefuse.datasets.token_cache import cache_run_settings  # noqa: PLC0415

        return cache_run_settings(cfg)

    def open_split(
        self, cfg: Mapping[str, Any], split: str, *, views: bool, report_dir: str | Path | None
    ) -> Dataset | None:
        """The split of the cache; its eval items hold every cached view (`views`) or the first."""
        from squarefuse.datasets.token_cache import TokenDataset  # noqa: PLC0415

        return TokenDataset(cfg, split, views=views, report_dir=report_dir)


FORMATS: dict[str, DatasetFormat] = {
    f.name: f for f in (SSv2(), Kinetics(), PathLabelList(), Synthetic(), TokenCache())
}


def find_format(name: Any) -> DatasetFormat:
    """The format `dataset.name` names."""
    if name not in FORMATS:
        raise ValueError(f"dataset.name={name!r}: choose one of {list(FORMATS)}")
    return FORMATS[name]
