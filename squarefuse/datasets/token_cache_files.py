"""The files of a token cache's split: their names, their checksums and the checks run when a split is opened.

`token_cache` writes and reads the cache (and re-exports these names); this module knows which
files a split folder holds (`SPLIT_FILE`, `shard_files`), what is recorded of each (`file_checksum`),
and checks a split's shards against its index.json and cache.json (`check_split_files`): sizes,
shapes and dtypes from the .npy headers, every row of the index within its shard, and the sha256 of
every shard and mask against the one recorded when it was written.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from squarefuse.runtime.atomic_file import TEMP_NAME

__all__ = [
    "CACHE_FILE",
    "INDEX_FILE",
    "SPLIT_FILE",
    "check_split_files",
    "file_checksum",
    "is_split_file",
    "remake_advice",
    "shard_files",
]

# The token cache's logger: these checks log under the name of the module that opens the cache.
log = logging.getLogger("squarefuse.datasets.token_cache")

CACHE_FILE = "cache.json"
INDEX_FILE = "index.json"
# The files the cache writes into a split folder: `overwrite=true` deletes these and nothing else.
SPLIT_FILE = re.compile(r"^(shard_\d{6}(\.npy|\.mask\.npy|\.json)|index\.json|failed\.csv)$")


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


def remake_advice(root: Path, split: str) -> str:
    """What to do about a damaged or incomplete split: the command that remakes it."""
    return f"remake the split with scripts/cache_tokens.py split={split} out={root} overwrite=true"


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
    remake = remake_advice(root, split)
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
