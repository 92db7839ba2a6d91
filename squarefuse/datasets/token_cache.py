"""The token cache: per-frame backbone tokens of a dataset's videos, stored once, read memory-mapped.

A frozen backbone without pixel augmentation gives each view of a video the same tokens at every
epoch, so `scripts/cache_tokens.py` runs it once and training a fusion reads the tokens instead of
decoding and running the backbone. Layout of a cache folder:

    cache.json                      what every split of the cache shares (`CACHE_KEYS`: format
                                    version, backbone, weights hash, frames, size, token option,
                                    dtype, views, token layout, class names; and the sampling)
    <split>/shard_000000.npy        float16 [n, V, T, N, D]: the tokens of n videos, V views each
    <split>/shard_000000.mask.npy   bool [n, V, T]: valid frames
    <split>/shard_000000.json       the shard's videos (index, id, path, label), its failures and the
                                    sha256 of its two arrays; written last: a shard without it is
                                    incomplete and redone
    <split>/index.json              every video of the split (id, path, label, shard, row, views), the
                                    split's name and the sha256 of every shard and mask file; written
                                    last: its presence means the split is complete
    <split>/failed.csv              the videos that did not decode (when any)

Every file is written atomically, and nothing here deletes a file of a cache: a folder that is not
a complete cache of the expected kind raises ValueError naming the folder and what to do.
Shards are `.npy` files read with `numpy.load(mmap_mode="r")` (no pickle).

Opening a split (`TokenDataset`) checks it whole, once per process: cache.json's keys, index.json's
rows (labels, shards, rows), each shard's size and shape against its header and cache.json, and the
sha256 of every shard and mask against the one recorded when it was written (about 0.06 s per 100 MB
from the page cache: a flipped bit, a truncated copy or a shard of another split is named there, not
trained on). A cache made before checksums were recorded is read with a warning that it is unverified.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from squarefuse.datasets.annotations import VideoRecord
from squarefuse.datasets.token_cache_files import (
    CACHE_FILE,
    INDEX_FILE,
    check_split_files,
    file_checksum,
    is_split_file,
    remake_advice,
    shard_files,
)
from squarefuse.runtime.atomic_file import atomic_write

__all__ = [
    "CACHE_FILE",
    "CACHE_KEYS",
    "CACHE_VERSION",
    "INDEX_FILE",
    "TOKEN_OPTIONS",
    "TokenDataset",
    "cache_run_settings",
    "check_split_files",
    "file_checksum",
    "is_split_file",
    "pool_tokens",
    "read_cache_info",
    "read_shard_json",
    "read_split_index",
    "shard_done",
    "shard_files",
    "write_shard",
    "write_split_index",
]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
TOKEN_OPTIONS = ("all", "cls", "pooled")
# The keys of cache.json that reading a cache needs (the others say how it was made).
CACHE_KEYS = (
    "version",
    "backbone_name",
    "weights_hash",
    "num_frames",
    "img_size",
    "tokens",
    "dtype",
    "views",
    "embed_dim",
    "num_prefix_tokens",
    "has_class_token",
    "num_tokens",
    "class_names",
)
# What index.json holds of each video: the key and its type.
VIDEO_KEYS = {"id": str, "path": str, "label": int, "shard": int, "row": int}
# What a run's dataset config may name and the cache must then match: the config key -> the cache's key.
EXPECTED_KEYS = {
    "backbone": "backbone_name",
    "weights_hash": "weights_hash",
    "num_frames": "num_frames",
    "img_size": "img_size",
    "tokens": "tokens",
    "task": "task",  # the synthetic task of the cached videos (null otherwise)
}


def pool_tokens(tokens_FND: torch.Tensor, option: str, *, num_prefix_tokens: int, grid: int) -> torch.Tensor:
    """The tokens a cache keeps of a backbone's output [F,N,D] (F frames): `all`, `cls` or `pooled`.

    `cls` keeps the prefix tokens (class token, registers); `pooled` keeps them and averages the
    patch tokens over a `grid x grid` map (adaptive average pooling of the square patch grid).
    """
    if option == "all":
        return tokens_FND
    prefix = tokens_FND[:, :num_prefix_tokens]
    if option == "cls":
        return prefix
    if option != "pooled":
        raise ValueError(f"tokens={option!r}: choose one of {', '.join(TOKEN_OPTIONS)}")
    patches = tokens_FND[:, num_prefix_tokens:]
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1] or not 1 <= grid <= side:
        raise ValueError(f"grid={grid}: the backbone has a {side}x{side} patch grid; choose 1..{side}")
    F, _, D = patches.shape
    maps = patches.transpose(1, 2).reshape(F, D, side, side)
    pooled = torch.nn.functional.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)
    return torch.cat([prefix, pooled], dim=1)


def _read_json(path: Path, *, what: str, folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{folder} is not a complete token cache: {path.name} is missing ({what}). "
            "Finish it with scripts/cache_tokens.py (a rerun continues where it stopped) or point to another folder"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}): rerun scripts/cache_tokens.py with overwrite=true") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is damaged (not a JSON object): rerun scripts/cache_tokens.py with overwrite=true")
    return data


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_cache_info(root: str | Path) -> dict[str, Any]:
    """The settings of the cache in `root` (cache.json), checked to be of this version and complete."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset.root={root}: no such folder; make the cache with scripts/cache_tokens.py")
    path = root / CACHE_FILE
    info = _read_json(path, what="written when caching starts", folder=root)
    version = info.get("version")
    if version != CACHE_VERSION:
        raise ValueError(
            f"{root} is a token cache of format version {version!r}, this squarefuse reads version "
            f"{CACHE_VERSION}: remake it with scripts/cache_tokens.py into a new folder (or overwrite=true)"
        )
    remake = f"remake the cache with scripts/cache_tokens.py out={root} overwrite=true (or into a new out= folder)"
    missing = [key for key in CACHE_KEYS if key not in info]
    if missing:
        raise ValueError(f"{path} lacks the key(s) {missing}: a damaged or hand-edited file? {remake}")
    bad = [key for key in ("num_frames", "num_tokens", "embed_dim") if not _positive_int(info[key])]
    views = info["views"]
    if not (isinstance(views, list) and len(views) == 2 and all(_positive_int(v) for v in views)):
        bad.append("views")
    if not (isinstance(info["class_names"], list) and info["class_names"]):
        bad.append("class_names")
    if info["dtype"] not in ("float16", "float32"):
        bad.append("dtype")
    if bad:
        values = ", ".join(f"{key}={info[key]!r}" for key in bad)
        raise ValueError(f"{path} has values no cache is made with: {values}. {remake}")
    info.setdefault("task", None)  # caches made before the key was recorded
    return info


def shard_done(split_dir: Path, shard: int) -> bool:
    """A shard is complete when its json (written after its arrays) exists."""
    return (split_dir / f"shard_{shard:06d}.json").is_file()


def write_shard(
    split_dir: Path,
    shard: int,
    *,
    tokens: np.ndarray,
    mask: np.ndarray,
    videos: Sequence[Mapping[str, Any]],
    errors: Mapping[int, str],
) -> None:
    """Write one shard atomically: the arrays first, then its json (their checksums), which marks it complete."""
    tokens_name, mask_name = shard_files(shard)
    with atomic_write(split_dir / tokens_name, "wb") as f:
        np.save(f, tokens, allow_pickle=False)
    with atomic_write(split_dir / mask_name, "wb") as f:
        np.save(f, mask.astype(bool), allow_pickle=False)
    # Read back from the page cache: what is on disk now is what every later read is checked against.
    files = {name: file_checksum(split_dir / name) for name in (tokens_name, mask_name)}
    with atomic_write(split_dir / f"shard_{shard:06d}.json") as f:
        json.dump({"videos": list(videos), "errors": {str(k): v for k, v in errors.items()}, "files": files}, f)


def read_shard_json(split_dir: Path, shard: int) -> dict[str, Any]:
    return json.loads((split_dir / f"shard_{shard:06d}.json").read_text(encoding="utf-8"))


def write_split_index(split_dir: Path, index: Mapping[str, Any]) -> None:
    with atomic_write(split_dir / INDEX_FILE) as f:
        json.dump(index, f)


def read_split_index(root: str | Path, split: str, *, num_classes: int) -> dict[str, Any]:
    """The index of one split of the cache in `root`, its rows checked (labels below `num_classes`).

    The shards it names are checked by `check_split_files`.
    """
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise ValueError(
            f"{root} has no {split!r} split: cache it with scripts/cache_tokens.py ... split={split} out={root}"
        )
    path = split_dir / INDEX_FILE
    index = _read_json(path, what=f"written when the {split} split is complete", folder=split_dir)
    remake = remake_advice(root, split)
    if not all(isinstance(index.get(key), list) for key in ("videos", "failed", "missing")):
        raise ValueError(f"{path} is damaged: it lacks the lists videos, failed and missing. {remake}")
    if index.get("split", split) != split:
        raise ValueError(
            f"{path} is the index of the {index['split']!r} split, not of {split!r}: a split folder moved or "
            f"copied under another name? Move it back, or {remake}"
        )
    for i, video in enumerate(index["videos"]):
        well_formed = isinstance(video, dict) and all(
            isinstance(video.get(key), kind) and not isinstance(video.get(key), bool)
            for key, kind in VIDEO_KEYS.items()
        )
        if not well_formed or video["shard"] < 0 or video["row"] < 0:
            raise ValueError(
                f"{path}: video {i} is not a video entry (id, path, label, shard, row; the last three integers "
                f">= 0): {video!r}. {remake}"
            )
        if not 0 <= video["label"] < num_classes:
            raise ValueError(
                f"{path}: video {i} ({video['id']}) has label {video['label']}, the cache has {num_classes} classes "
                f"(labels 0..{num_classes - 1}, cache.json's class_names). {remake}"
            )
    return index


def cache_run_settings(dataset_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a run on the cache in ``dataset.root`` takes from its cache.json, as {dotted config key: value}.

    The `dataset` keys of `EXPECTED_KEYS` that the run sets must equal the cache's values (ValueError
    naming both); all of them, and the backbone's name, frame size and token layout that
    `CachedTokens` is built with, come from the cache, so that the run's stored config says which
    cache it was trained on and an eval or a resume against another cache is refused. Nothing is
    written: `squarefuse.training.config_checks.run_config` makes the run's config from these.
    """
    root = Path(str(dataset_cfg["root"]))
    info = read_cache_info(root)
    check_expected(dataset_cfg, info, root)
    settings = {f"dataset.{key}": info[cache_key] for key, cache_key in EXPECTED_KEYS.items()}
    settings |= {
        f"backbone.model_kwargs.{key}": info[key]
        for key in ("embed_dim", "num_prefix_tokens", "has_class_token", "num_tokens")
    }
    settings |= {"backbone.name": info["backbone_name"], "backbone.img_size": info["img_size"]}
    for key, value in settings.items():
        # OmegaConf would resolve it in the run's config (`${oc.env:...}` reads the environment, into
        # paths and messages): cache.json, like a checkpoint, holds values, never interpolations.
        if isinstance(value, str) and "${" in value:
            raise ValueError(
                f"{root / CACHE_FILE}: the value for {key} holds an interpolation ('${{...}}'): the file was "
                f"changed after caching; refusing to put it into the run's config. Make the cache again "
                f"(scripts/cache_tokens.py out={root} overwrite=true, every split)"
            )
    return settings


def check_expected(dataset_cfg: Mapping[str, Any], info: Mapping[str, Any], root: Path) -> None:
    for key, cache_key in EXPECTED_KEYS.items():
        expected = dataset_cfg.get(key)
        if expected is not None and expected != info[cache_key]:
            raise ValueError(
                f"dataset.{key}={expected!r} but the token cache {root} was made with {key} {info[cache_key]!r}: "
                "use a cache made with the run's settings (scripts/cache_tokens.py) or change dataset.{key}"
            )


class TokenDataset(Dataset):
    """One split of a token cache, with the items of `VideoDataset` holding tokens instead of pixels.

    Train items: ``{"video": float16 [T,N,D], "mask": bool [T], "label", "index", "num_replaced": 0}``,
    one of the cached views, drawn from torch's generator (seeded per sample by
    `squarefuse.training.sample_order.SeededDataset`, so a resumed run draws the same views).
    Eval items: ``{"video": float16 [V,T,N,D], "mask": bool [V,T], "label", "index", "failed": False,
    "error": ""}``: every cached view with `views` (eval's multi-view average is then the average over
    them), the first cached view only without (the trainer's clip-level validation).
    Videos that did not decode when caching are not in the cache; they are listed in `missing`.

    Args:
        dataset_cfg: the `dataset` block (root, and the expected backbone/frames/size/tokens).
        split: the split's folder in the cache; "train" gives train items.
        views: eval items: every cached view, not only the first.
        report_dir: where `token_cache_{split}.json` records the cache files read, with their
            checksums (the run folder); None writes nothing (non-zero ranks).

    Raises:
        ValueError: the cache is not of the run's settings, incomplete or damaged (see
            `check_split_files`), named with the file and what to do.
    """

    decode_device = "cpu"  # read by the trainer, which decodes nothing on the device here

    def __init__(
        self,
        dataset_cfg: Mapping[str, Any],
        split: str,
        *,
        views: bool = True,
        report_dir: str | Path | None = None,
    ) -> None:
        self.root = Path(str(dataset_cfg["root"]))
        info = read_cache_info(self.root)
        check_expected(dataset_cfg, info, self.root)
        index = read_split_index(self.root, split, num_classes=len(info["class_names"]))
        # Checked whole here, once per process: the loader's workers get this object, checked.
        self.files = check_split_files(self.root, split, index, info)
        if report_dir is not None:
            record = {
                "root": str(self.root.resolve()),
                "split": split,
                "verified": "files" in index,
                "files": self.files,
            }
            with atomic_write(Path(report_dir) / f"token_cache_{split}.json") as f:
                json.dump(record, f, indent=1)
        self.split, self.train = split, split == "train"
        self.class_names = list(info["class_names"])
        self.num_classes = len(self.class_names)
        self.cached_views = tuple(info["views"])
        self.all_views = views
        videos = index["videos"]
        if not videos:
            raise ValueError(f"{self.root / split}: no videos in the cache (see its failed.csv)")
        self.records = [VideoRecord(v["path"], int(v["label"]), v["id"]) for v in videos]
        self.missing = [f["path"] for f in index["failed"]] + list(index["missing"])
        self._where = [(int(v["shard"]), int(v["row"])) for v in videos]
        self._split_dir = self.root / split
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def views(self) -> tuple[int, int]:
        """(clips, crops) of each eval item; (1, 1) in train."""
        return self.cached_views if self.all_views and not self.train else (1, 1)

    def __len__(self) -> int:
        return len(self.records)

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        # Opened lazily in each worker: a memory map is cheap, and pages are shared between processes.
        if shard not in self._arrays:
            name = self._split_dir / f"shard_{shard:06d}"
            self._arrays[shard] = (
                np.load(f"{name}.npy", mmap_mode="r", allow_pickle=False),
                np.load(f"{name}.mask.npy", mmap_mode="r", allow_pickle=False),
            )
        return self._arrays[shard]

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, row = self._where[index]
        tokens, mask = self._shard(shard)
        record = self.records[index]
        if self.train:
            view = int(torch.randint(tokens.shape[1], ()))
            return {
                "video": torch.from_numpy(np.array(tokens[row, view])),
                "mask": torch.from_numpy(np.array(mask[row, view])),
                "label": record.label,
                "index": index,
                "num_replaced": 0,
            }
        kept = slice(None) if self.all_views else slice(0, 1)
        return {
            "video": torch.from_numpy(np.array(tokens[row, kept])),
            "mask": torch.from_numpy(np.array(mask[row, kept])),
            "label": record.label,
            "index": index,
            "failed": False,
            "error": "",
        }


def to_plain(cfg: Any) -> Any:
    """A DictConfig as plain containers (for cache.json), anything else as it is."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
