"""Feature extraction: what is saved, in which order, rerun safety, and 1 vs 2 processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoints import LABELS, compose_config, make_checkpoint, make_list_dataset, tiny_train_cfg
from helpers.scripts import run_script, torchrun

import squarefuse
from squarefuse.apps.extract import run_extract

REPO = Path(__file__).resolve().parents[1]
CORRUPT = 3
OK = [i for i in range(len(LABELS)) if i != CORRUPT]
# The tiny model of test_eval: 32 px frames of 16 px patches (4 patches + the class token), K=4, Q=3, P=2.
N, D, K = 5, 48, 4


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return make_list_dataset(tmp_path_factory.mktemp("extract_videos"), LABELS, corrupt=CORRUPT)


@pytest.fixture(scope="module")
def ckpt(videos, tmp_path_factory) -> Path:
    path, _ = make_checkpoint(
        tmp_path_factory.mktemp("extract_run") / "checkpoints" / "best.pt", tiny_train_cfg(videos)
    )
    return path


def extract_cfg(ckpt: Path, *extra: str):
    return compose_config("extract", [f"ckpt={ckpt}", "num_workers=0", "device=cpu", "progress=false", *extra])


def read_rows(out: Path, name: str = "videos.csv") -> list[dict[str, str]]:
    with (out / name).open() as f:
        return list(csv.DictReader(f))


def test_extract_split_features_order_aux_and_reruns(ckpt, videos, tmp_path):
    out = tmp_path / "features"
    summary = run_extract(extract_cfg(ckpt, "aux=true"), out)
    features = np.load(out / "features.npy")
    assert features.shape == (len(OK), D) and features.dtype == np.float32
    assert np.load(out / "aux_quantiles.npy").shape == (len(OK), N, K, 3)
    assert np.load(out / "aux_trend.npy").shape == (len(OK), N, K, 3)
    rows = read_rows(out)
    assert [int(r["index"]) for r in rows] == OK and [int(r["row"]) for r in rows] == list(range(len(OK)))
    assert [r["id"] for r in rows] == [f"v{i}.mp4" for i in OK] and [int(r["label"]) for r in rows] == [
        LABELS[i] for i in OK
    ]
    failed = read_rows(out, "failed.csv")
    assert [r["id"] for r in failed] == [f"v{CORRUPT}.mp4"] and "v3.mp4" in failed[0]["error"]
    assert summary["num_videos"] == len(OK) and summary["num_failed"] == 1 and summary["views"] == [1, 1]

    # Row r is the video of videos.csv row r: the pre-logits feature, and the final linear layer
    # of the head maps it to the model's logits.
    model = squarefuse.load_model(ckpt)
    for r in (0, len(OK) - 1):
        video, mask = model.preprocess(rows[r]["path"])
        with torch.no_grad():
            h, stats = model.model.forward_features(video, mask)
            expected = model.model.forward_head(h, mask, pre_logits=True).mean(0)
            logits = model.model(video, mask)
        torch.testing.assert_close(torch.from_numpy(features[r]), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.model.head.fc(expected[None]), logits.mean(0, keepdim=True))
        torch.testing.assert_close(torch.from_numpy(np.load(out / "aux_trend.npy")[r]), stats["trend"].mean(0))

    # A rerun with the same settings leaves the complete folder alone.
    stamp = (out / "features.npy").stat().st_mtime_ns
    assert run_extract(extract_cfg(ckpt, "aux=true"), out)["num_videos"] == len(OK)
    assert (out / "features.npy").stat().st_mtime_ns == stamp
    # Other settings into the same folder: an error naming what differs, nothing touched.
    with pytest.raises(ValueError, match="views"):
        run_extract(extract_cfg(ckpt, "aux=true", "views=2x3"), out)
    assert (out / "features.npy").stat().st_mtime_ns == stamp
    # overwrite=true redoes it cleanly: files of the previous settings are gone.
    summary = run_extract(extract_cfg(ckpt, "views=2x3", "overwrite=true"), out)
    assert summary["views"] == [2, 3] and not (out / "aux_trend.npy").exists()
    assert np.load(out / "features.npy").shape == (len(OK), D)
    assert json.loads((out / "extract.json").read_text())["views"] == [2, 3]
    assert not list(out.glob(".*.tmp"))


def test_extract_input_list(ckpt, videos, tmp_path):
    listing = tmp_path / "mine.txt"
    listing.write_text(f"{videos}/v5.mp4\n{videos}/v0.mp4 1\n")
    summary = run_extract(extract_cfg(ckpt, f"input={listing}"), tmp_path / "out")
    assert summary["input"] == str(listing) and summary["split"] is None
    rows = read_rows(tmp_path / "out")
    assert [Path(r["path"]).name for r in rows] == ["v5.mp4", "v0.mp4"] and [r["label"] for r in rows] == ["-1", "1"]
    assert np.load(tmp_path / "out" / "features.npy").shape == (2, D)
    assert not (tmp_path / "out" / "failed.csv").exists()


@pytest.mark.slow
def test_extract_two_processes_equals_one(ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [f"ckpt={ckpt}", "num_workers=0", "device=cpu", "progress=false", "aux=true"]
    (tmp_path / "cwd_two").mkdir()
    done = subprocess.run(
        torchrun("scripts/extract.py", *args),
        cwd=tmp_path / "cwd_two",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = run_script("scripts/extract.py", *args, f"hydra.run.dir={tmp_path}/one", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # No hydra.run.dir under torchrun: both ranks agreed on one <run>/extract/<stamp> folder.
    (two,) = [p.parent for p in (ckpt.parent.parent / "extract").glob("*/extract.json")]
    one = tmp_path / "one"
    assert json.loads((two / "extract.json").read_text())["world_size"] == 2
    assert read_rows(one) == read_rows(two) and [int(r["index"]) for r in read_rows(two)] == OK
    assert read_rows(one, "failed.csv") == read_rows(two, "failed.csv")
    for name in ("features.npy", "aux_quantiles.npy", "aux_trend.npy"):
        np.testing.assert_allclose(np.load(two / name), np.load(one / name), rtol=1e-5, atol=1e-6)
