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

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from squarefuse.datasets.annotations import VideoRecord
from squarefuse.runtime.atomic_file import TEMP_NAME, atomic_write

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
CACHE_FILE = "cache.json"
INDEX_FILE = "index.json"
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
# The files the cache writes into a split folder: `overwrite=true` deletes these and nothing else.
SPLIT_FILE = re.compile(r"^(shard_\d{6}(\.npy|\.mask\.npy|\.json)|index\.json|failed\.csv)$")
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


def _remake(root: Path, split: str) -> str:
    return f"remake the split with scripts/cache_tokens.py split={split} out={root} overwrite=true"


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


def shard_files(shard: int) -> tuple[str, str]:
    """The names of a shard's two arrays: its tokens and its mask."""
    return f"shard_{shard:06d}.npy", f"shard_{shard:06d}.mask.npy"


def is_split_file(name: str) -> bool:
    """Whether a split folder's file of this name is one the cache writes (or a temporary file of its writes)."""
    temp = TEMP_NAME.match(name)
    return SPLIT_FILE.match(temp["name"] if temp else name) is not None


def file_checksum(path: Path) -> dict[str, Any]:
    """{"sha256", "bytes"} of a file: what a split records of each of its arrays."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"sha256": digest, "bytes": path.stat().st_size}


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
    remake = _remake(root, split)
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


def _npy_header(path: Path, remake: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of a .npy file, after checking that the file holds exactly the bytes they need.

    numpy's memory map would only fail at the first item read from a truncated file ("mmap length is
    greater than file size", in a loader worker); its header is enough to tell here.
    """
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise ValueError(f".npy format version {version}, not one np.save writes")
            shape, _, dtype = readers[version](f)
            offset = f.tell()
    except ValueError as e:
        raise ValueError(f"{path} is not a .npy file of a token cache ({e}): {remake}") from None
    size, expected = path.stat().st_size, offset + math.prod(shape) * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "damaged"
        raise ValueError(
            f"{path} is {what}: {size} bytes, its header says {expected} (an interrupted copy, a full disk?): {remake}"
        )
    return shape, dtype


def _shard_rows(split_dir: Path, shard: int, info: Mapping[str, Any], remake: str) -> int:
    """The number of videos in a shard, after checking its arrays against cache.json."""
    tokens_path, mask_path = (split_dir / name for name in shard_files(shard))
    for path in (tokens_path, mask_path):
        if not path.is_file():
            raise ValueError(f"{split_dir} is incomplete: {path.name} is missing. {remake}")
    shape, dtype = _npy_header(tokens_path, remake)
    clips, crops = info["views"]
    described = {
        "views (clips x crops)": clips * crops,
        "num_frames": info["num_frames"],
        "num_tokens": info["num_tokens"],
        "embed_dim": info["embed_dim"],
    }
    if len(shape) != 5:
        raise ValueError(
            f"{tokens_path} holds an array of shape {shape}, not [videos, {', '.join(described)}]: {remake}"
        )
    differ = [
        f"{key} {value} in {CACHE_FILE}, {size} in the shard"
        for (key, value), size in zip(described.items(), shape[1:], strict=True)
        if size != value
    ]
    if dtype != np.dtype(info["dtype"]):
        differ.append(f"dtype {info['dtype']} in {CACHE_FILE}, {dtype} in the shard")
    if differ:
        raise ValueError(
            f"{tokens_path} does not hold what {split_dir.parent / CACHE_FILE} describes: {'; '.join(differ)} "
            f"(an edited cache.json, or a shard of another cache?): {remake}"
        )
    mask_shape, mask_dtype = _npy_header(mask_path, remake)
    if mask_shape != shape[:3] or mask_dtype != np.bool_:
        raise ValueError(f"{mask_path} holds {mask_dtype} {mask_shape}, its tokens need bool {shape[:3]}: {remake}")
    return shape[0]


def check_split_files(root: Path, split: str, index: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """Check every shard of a split against its index and cache.json; the checksums of the files read.

    Sizes and shapes first (cheap, and the clearest message), then every row of the index within its
    shard, then the sha256 of every shard and mask against the one index.json recorded when it was
    written. Returns {path relative to `root`: {"sha256", "bytes"}} for cache.json, index.json and
    every shard and mask: what a run records of the cache it read.
    """
    split_dir = root / split
    index_path = split_dir / INDEX_FILE
    remake = _remake(root, split)
    recorded = index.get("files")
    shards = {video["shard"] for video in index["videos"]}
    if recorded is not None:
        shards |= {int(name[6:12]) for name in recorded if SPLIT_FILE.match(name) and name.endswith(".npy")}
    rows = {shard: _shard_rows(split_dir, shard, info, remake) for shard in sorted(shards)}
    first = {}
    for i, video in enumerate(index["videos"]):
        where, tokens_name = (video["shard"], video["row"]), shard_files(video["shard"])[0]
        if video["row"] >= rows[video["shard"]]:
            raise ValueError(
                f"{index_path}: video {i} ({video['id']}) is row {video['row']} of {tokens_name}, which holds "
                f"{rows[video['shard']]} videos. {remake}"
            )
        if where in first:
            raise ValueError(
                f"{index_path}: video {i} ({video['id']}) is row {video['row']} of {tokens_name}, as is video "
                f"{first[where]}. {remake}"
            )
        first[where] = i

    start, files = time.perf_counter(), {}
    for name in (name for shard in sorted(shards) for name in shard_files(shard)):
        actual = file_checksum(split_dir / name)
        if recorded is not None:
            expected = recorded.get(name) or {}
            if expected.get("sha256") != actual["sha256"]:
                raise ValueError(
                    f"{split_dir / name} is damaged: its sha256 {actual['sha256']} is not the "
                    f"{expected.get('sha256')} recorded in {index_path} when it was written (a bad disk or copy, "
                    f"or a file of another split or cache): {remake}"
                )
        files[f"{split}/{name}"] = actual
    seconds, total = time.perf_counter() - start, sum(f["bytes"] for f in files.values())
    if recorded is None:
        log.warning(
            f"{index_path} records no checksums (a cache made before squarefuse recorded them): its {len(files)} "
            f"shard files are read unverified; to have them checked, {remake}"
        )
    else:
        log.info(f"{split_dir}: {len(files)} shard files ({total / 1e6:.1f} MB) verified (sha256) in {seconds:.2f} s")
    return {
        CACHE_FILE: file_checksum(root / CACHE_FILE),
        f"{split}/{INDEX_FILE}": file_checksum(index_path),
        **files,
    }


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
    return settings | {"backbone.name": info["backbone_name"], "backbone.img_size": info["img_size"]}


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
