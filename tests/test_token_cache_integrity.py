"""A token cache on bad disks and in careless hands: damaged files are found and named when the cache
is opened, a run records the files it read, and `overwrite=true` deletes only what the cache wrote.

The caches are the ones of test_token_cache.py (8 train and 5 val videos of 10 frames, a tiny backbone),
copied before each damage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import test_token_cache
from helpers.scripts import run_script
from test_token_cache import REPO, cache_cfg, make_cache, token_train_cfg

from squarefuse.apps.cache_tokens import run_cache_tokens
from squarefuse.datasets.token_cache import TokenDataset
from squarefuse.training.trainer import check_train_config, train

# test_token_cache.py's fixtures (built again for this module): its videos and the checkpoint cached.
videos, ckpt = test_token_cache.videos, test_token_cache.ckpt


@pytest.fixture(scope="module")
def cache(ckpt, tmp_path_factory) -> Path:
    """train: shards of 3, 3 and 2 videos; val: 3 and 2. float32 tokens [n, 1, 10, N, 48]."""
    return make_cache(ckpt, tmp_path_factory.mktemp("integrity") / "cache", "dtype=float32", "shard_size=3")


@pytest.fixture
def copy(cache, tmp_path) -> Path:
    """A copy of the cache to damage."""
    return Path(shutil.copytree(cache, tmp_path / "copy"))


def open_split(root: Path, split: str = "train") -> TokenDataset:
    return TokenDataset({"name": "tokens", "root": str(root)}, split)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------- checksums


def test_a_flipped_bit_in_a_shard_is_found_when_the_cache_is_opened_and_named(copy):
    shard = copy / "train" / "shard_000001.npy"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x04  # a token's bits: numpy reads the file without a word
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"copy/train/shard_000001.npy is damaged: its sha256 .* overwrite=true"):
        open_split(copy)


def test_a_shard_of_another_split_is_refused(copy):
    # val's second shard holds v3 and v4, train's third v6 and v7: the same shape, only the bytes differ.
    shutil.copyfile(copy / "val" / "shard_000001.npy", copy / "train" / "shard_000002.npy")
    with pytest.raises(ValueError, match=r"copy/train/shard_000002.npy is damaged: its sha256"):
        open_split(copy)


def test_a_split_folder_moved_under_another_name_is_refused(copy):
    (copy / "val").rename(copy / "test")
    with pytest.raises(ValueError, match=r"copy/test/index.json is the index of the 'val' split"):
        open_split(copy, "test")


def test_a_cache_made_before_checksums_is_read_with_a_warning_that_it_is_unverified(copy, caplog):
    edit_json(copy / "train" / "index.json", lambda index: [index.pop("files", None), index.pop("split", None)])
    with caplog.at_level(logging.WARNING):
        dataset = open_split(copy)
    assert len(dataset) == 8
    assert "copy/train/index.json records no checksums" in caplog.text and "unverified" in caplog.text


def test_a_training_run_records_the_cache_files_it_read_with_their_checksums(cache, tmp_path):
    run = tmp_path / "run"
    train(token_train_cfg(cache, None, "trainer.epochs=1"), run)
    for split, shards in (("train", 3), ("val", 2)):
        record = json.loads((run / f"token_cache_{split}.json").read_text())
        assert record["root"] == str(cache.resolve()) and record["split"] == split and record["verified"]
        names = ["cache.json", f"{split}/index.json"]
        names += [f"{split}/shard_{k:06d}{suffix}" for k in range(shards) for suffix in (".npy", ".mask.npy")]
        assert sorted(record["files"]) == sorted(names)
        for name, file in record["files"].items():
            assert file == {"sha256": sha256(cache / name), "bytes": (cache / name).stat().st_size}, name


# ------------------------------------------------------------------------------- damaged files


def truncate(path: Path, by: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:-by])


def set_video(key: str, value) -> callable:
    def edit(index: dict) -> None:
        index["videos"][4][key] = value

    return edit


DAMAGE = {
    "truncated shard": (
        lambda root: truncate(root / "train" / "shard_000002.npy"),
        r"copy/train/shard_000002.npy is truncated: \d+ bytes, its header says \d+ .*overwrite=true",
    ),
    "truncated mask": (
        lambda root: truncate(root / "train" / "shard_000000.mask.npy", by=3),
        r"copy/train/shard_000000.mask.npy is truncated",
    ),
    "not a npy file": (
        lambda root: (root / "train" / "shard_000000.npy").write_text("notes"),
        r"copy/train/shard_000000.npy is not a .npy file",
    ),
    "label out of range": (
        lambda root: edit_json(root / "train" / "index.json", set_video("label", 7)),
        r"copy/train/index.json: video 4 \(v4.mp4\) has label 7, the cache has 3 classes.*overwrite=true",
    ),
    "row out of range": (
        lambda root: edit_json(root / "train" / "index.json", set_video("row", 5)),
        r"copy/train/index.json: video 4 \(v4.mp4\) is row 5 of shard_000001.npy, which holds 3 videos",
    ),
    "row without its label": (
        lambda root: edit_json(root / "train" / "index.json", lambda index: index["videos"][2].pop("label")),
        r"copy/train/index.json: video 2 is not a video entry .*label",
    ),
    "two videos in one row": (
        lambda root: edit_json(root / "train" / "index.json", set_video("row", 0)),
        r"copy/train/index.json: video 4 \(v4.mp4\) is row 0 of shard_000001.npy, as is video 3",
    ),
    "cache.json without weights_hash": (
        lambda root: edit_json(root / "cache.json", lambda info: info.pop("weights_hash")),
        r"copy/cache.json lacks the key\(s\) \['weights_hash'\].*overwrite=true",
    ),
    "num_frames edited": (
        lambda root: edit_json(root / "cache.json", lambda info: info.update(num_frames=8)),
        r"copy/train/shard_000000.npy does not hold what .*copy/cache.json describes: "
        r"num_frames 8 in cache.json, 10 in the shard",
    ),
    "views edited": (
        lambda root: edit_json(root / "cache.json", lambda info: info.update(views=[2, 1])),
        r"shard_000000.npy does not hold what .*cache.json describes: "
        r"views \(clips x crops\) 2 in cache.json, 1 in the shard",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_cache_is_refused_when_opened_naming_the_file_and_what_to_do(copy, case):
    damage, match = DAMAGE[case]
    damage(copy)
    with pytest.raises(ValueError, match=match):
        open_split(copy)


def test_a_cache_json_without_a_key_is_named_before_training_starts(copy):
    edit_json(copy / "cache.json", lambda info: info.pop("weights_hash"))
    with pytest.raises(ValueError, match=r"copy/cache.json lacks the key\(s\) \['weights_hash'\]"):
        check_train_config(token_train_cfg(copy, None))


def test_an_interpolation_in_cache_json_never_reaches_the_run_config(copy, monkeypatch):
    monkeypatch.setenv("SQUAREFUSE_TEST_SECRET", "sk-SECRET-42")
    edit_json(copy / "cache.json", lambda info: info.update(backbone_name="${oc.env:SQUAREFUSE_TEST_SECRET}"))
    with pytest.raises(ValueError) as error:
        check_train_config(token_train_cfg(copy, None))
    message = str(error.value)
    assert re.search(
        r"copy/cache.json: the value for (dataset\.backbone|backbone\.name) holds an interpolation", message
    )
    assert "sk-SECRET-42" not in message


# ------------------------------------------------------------------------------- overwrite=true


def script_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    common = ["num_workers=0", "device=cpu", "progress=false", "views=1x1", "split=train"]
    return [str(REPO / "scripts" / "cache_tokens.py"), f"ckpt={ckpt}", f"out={out}", *common, *extra]


def test_overwrite_never_deletes_a_file_the_cache_did_not_write(ckpt, tmp_path):
    # The example: a folder of the user's, not a cache.
    notes = tmp_path / "v" / "train" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("notes")
    done = run_script(*script_args(ckpt, tmp_path / "v", "overwrite=true"), cwd=tmp_path)
    assert done.returncode == 2 and "v/train is not a split of a token cache" in done.stderr, done.stderr[-2000:]
    assert "notes.txt" in done.stderr and notes.read_text() == "notes"

    # A cache's split folder holding a file of the user's too: refused, nothing deleted.
    out = tmp_path / "cache"
    run_cache_tokens(cache_cfg(ckpt, out, "split=train"))
    (out / "train" / "notes.txt").write_text("notes")
    files = sorted(p.name for p in (out / "train").iterdir())
    with pytest.raises(ValueError, match=r"cache/train holds files the token cache did not write: \['notes.txt'\]"):
        run_cache_tokens(cache_cfg(ckpt, out, "split=train", "overwrite=true"))
    assert sorted(p.name for p in (out / "train").iterdir()) == files


def test_overwrite_with_other_settings_remakes_a_one_split_cache_made_by_the_script(ckpt, tmp_path):
    out = tmp_path / "cache"
    first = run_script(*script_args(ckpt, out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / ".hydra_logs").is_dir()  # the app's own logs: not a split of the cache
    again = run_script(*script_args(ckpt, out, "tokens=cls", "overwrite=true"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "cache.json").read_text())["tokens"] == "cls"
    assert open_split(out).records and np.load(out / "train" / "shard_000000.npy").shape[3] == 1  # the class token


def test_overwrite_remakes_the_split_and_keeps_the_other_splits(ckpt, cache, tmp_path):
    out = Path(shutil.copytree(cache, tmp_path / "cache"))
    val = {p.name: p.stat().st_mtime_ns for p in (out / "val").iterdir()}
    run_cache_tokens(cache_cfg(ckpt, out, "split=train", "dtype=float32", "shard_size=3", "overwrite=true"))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "val").iterdir()} == val
    assert len(open_split(out)) == 8 and len(open_split(out, "val")) == 5
