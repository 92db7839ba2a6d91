"""Predict: the `squarefuse.load_model` / `squarefuse.predict` API and `scripts/predict.py`."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import (
    CLASS_NAMES,
    LABELS,
    compose_config,
    make_checkpoint,
    make_list_dataset,
    run_evaluate,
    tiny_train_cfg,
)
from helpers.scripts import run_script

import squarefuse
from squarefuse.api import predict_probs
from squarefuse.apps.predict import run_predict
from squarefuse.checkpoint import build_model_from_checkpoint, load_checkpoint, select_weights
from squarefuse.config.dataset_overrides import merge_dataset_overrides
from squarefuse.datasets import DecodeError, build_dataset
from squarefuse.datasets.inputs import find_videos, parse_views

REPO = Path(__file__).resolve().parents[1]
CORRUPT = 3  # v3.mp4 is not a video


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = make_list_dataset(tmp_path_factory.mktemp("predict_videos"), LABELS, corrupt=CORRUPT)
    (root / "more" / "deeper").mkdir(parents=True)
    shutil.copy(root / "v1.mp4", root / "more" / "deeper" / "nested.webm")  # found recursively, any extension
    return root


@pytest.fixture(scope="module")
def ckpt(videos, tmp_path_factory) -> Path:
    path, _ = make_checkpoint(
        tmp_path_factory.mktemp("predict_run") / "checkpoints" / "best.pt", tiny_train_cfg(videos)
    )
    return path


@pytest.mark.slow
def test_api_round_trip_equals_eval(ckpt):
    model = squarefuse.load_model(ckpt)
    assert model.weights == "ema" and model.class_names == CLASS_NAMES
    assert not any(m.training for m in model.model.modules())
    assert model.preprocess.views == (1, 1)  # the checkpoint's test_clips x test_crops

    state = load_checkpoint(ckpt)
    reference = build_model_from_checkpoint(state, select_weights(state, use_ema=True)[0])
    for views in [(1, 1), (2, 3)]:
        dataset_cfg = merge_dataset_overrides(
            state["config"]["dataset"], {"test_clips": views[0], "test_crops": views[1]}
        )
        dataset = build_dataset(dataset_cfg, "val", views=True)
        result = run_evaluate(reference, dataset)
        assert result.views == views
        assert result.failed_indices == [CORRUPT]
        for row, index in enumerate(result.indices.tolist()):
            path = dataset.records[index].path
            probs = predict_probs(model, path, views=None if views == (1, 1) else f"{views[0]}x{views[1]}")
            torch.testing.assert_close(probs, result.probs[row], rtol=1e-5, atol=1e-6)
        top = squarefuse.predict(model, path, topk=2, views=views)  # the last video
        expected = result.probs[-1].topk(2)
        assert [name for name, _ in top] == [CLASS_NAMES[i] for i in expected.indices.tolist()]
        assert [p for _, p in top] == pytest.approx(expected.values.tolist(), abs=1e-6)

    # The EMA weights were used: the model weights give other probabilities.
    plain = squarefuse.load_model(ckpt, use_ema=False)
    assert plain.weights == "model"
    path = dataset.records[0].path
    assert not torch.allclose(predict_probs(plain, path), predict_probs(model, path))

    with pytest.raises(DecodeError, match=f"v{CORRUPT}.mp4"):
        squarefuse.predict(model, dataset.records[CORRUPT].path)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        squarefuse.predict(model, Path(path).parent / "nope.mp4")


def test_find_videos_folder_list_and_errors(videos, tmp_path):
    found = find_videos(videos)
    # Sorted, recursive, videos only (the list and class files of the folder are left out).
    assert [r.id for r in found] == ["more/deeper/nested.webm"] + [f"v{i}.mp4" for i in range(len(LABELS))]
    assert all(r.label == -1 and Path(r.path).is_file() for r in found)

    listing = tmp_path / "videos.txt"
    listing.write_text(f"# a comment\n{videos}/v0.mp4 2\n\n{videos}/v1.mp4\nrelative clip.mp4 1\n")
    records = find_videos(listing)
    assert [(Path(r.path).name, r.label) for r in records] == [("v0.mp4", 2), ("v1.mp4", -1), ("relative clip.mp4", 1)]
    assert records[2].path == str(tmp_path / "relative clip.mp4")

    with pytest.raises(FileNotFoundError, match="input=.*missing_dir"):
        find_videos(tmp_path / "missing_dir")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no video here")
    with pytest.raises(ValueError, match="input=.*empty: no video files"):
        find_videos(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="neither a video"):
        find_videos(tmp_path / "weights.bin")
    empty_list = tmp_path / "empty.txt"
    empty_list.write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no video"):
        find_videos(empty_list)


def test_find_videos_reports_what_it_skips(videos, tmp_path, caplog):
    # Before: a symlink loop, a folder named x.mp4 and a FIFO were dropped without a word.
    folder = tmp_path / "input"
    folder.mkdir()
    shutil.copy(videos / "v0.mp4", folder / "ok.mp4")
    (folder / "loop.mp4").symlink_to("loop.mp4")
    (folder / "x.mp4").mkdir()
    os.mkfifo(folder / "pipe.mp4")
    (folder / "broken.mp4").symlink_to("gone.mp4")
    (folder / "up").symlink_to(".")
    with caplog.at_level(logging.WARNING, logger="squarefuse"):
        found = find_videos(folder)
    assert [r.id for r in found] == ["ok.mp4"]
    reasons = {
        "loop.mp4": "a symlink loop",
        "x.mp4": "a folder",
        "pipe.mp4": "a FIFO",
        "broken.mp4": "a broken link",
        "up": "a link to a folder",
    }
    for name, why in reasons.items():
        assert any(f"skipped {name}: {why}" in m for m in caplog.messages), (name, caplog.messages)
    assert f"{len(reasons)} entries skipped" in caplog.text

    os.remove(folder / "ok.mp4")
    with pytest.raises(ValueError, match=f"no video files.*{len(reasons)} entries skipped"):
        find_videos(folder)


def test_parse_views():
    assert parse_views("2x3") == (2, 3) and parse_views([1, 1]) == (1, 1) and parse_views("5X3") == (5, 3)
    for bad in ("2", "2x2", "0x1", "axb", "1x1x1"):
        with pytest.raises(ValueError, match="views="):
            parse_views(bad)


def test_run_predict_list_with_missing_file_and_labels(ckpt, videos, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{videos}/v0.mp4 0\n{videos}/gone.mp4 1\n{videos}/v{CORRUPT}.mp4 0\n{videos}/v2.mp4\n")
    cfg = compose_config(
        "predict", [f"ckpt={ckpt}", f"input={listing}", "topk=5", "num_workers=0", "device=cpu", "progress=false"]
    )
    rows = run_predict(cfg, tmp_path / "out")
    assert [Path(r["path"]).name for r in rows] == ["v0.mp4", "gone.mp4", f"v{CORRUPT}.mp4", "v2.mp4"]
    assert [r["label"] for r in rows] == [0, 1, 0, -1]
    assert "video not found" in rows[1]["error"] and f"v{CORRUPT}.mp4" in rows[2]["error"]
    for row in (rows[0], rows[3]):
        assert row["error"] is None and len(row["top"]) == len(CLASS_NAMES)  # topk capped at the class count
        assert sum(t["prob"] for t in row["top"]) == pytest.approx(1.0, abs=1e-4)
    model = squarefuse.load_model(ckpt)
    expected = squarefuse.predict(model, f"{videos}/v2.mp4", topk=3)
    assert [(t["class"], t["prob"]) for t in rows[3]["top"]] == [(c, pytest.approx(p, abs=1e-5)) for c, p in expected]

    cfg.input = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no video files"):
        run_predict(cfg, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_predict_script_on_a_folder_with_a_corrupt_file(ckpt, videos, tmp_path):
    command = [f"ckpt={ckpt}", f"input={videos}"]
    # A worker that hung (as one did, forked after test_api_round_trip_equals_eval had decoded in
    # this process: tests/test_loader_stalls.py) fails the run in 2 minutes instead of hanging it.
    options = ["views=1x1", "topk=2", "num_workers=1", "device=cpu", "loader_timeout=120"]
    done = run_script("scripts/predict.py", *command, *options, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    outputs = list((ckpt.parent.parent / "predict").glob("*/predictions.csv"))
    assert len(outputs) == 1  # the default output folder: <run>/predict/<stamp>
    with outputs[0].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(LABELS) + 1
    assert list(rows[0]) == ["path", "id", "label", "error", "class_1", "prob_1", "class_2", "prob_2"]
    failed = [r for r in rows if r["error"]]
    assert [r["id"] for r in failed] == [f"v{CORRUPT}.mp4"] and failed[0]["class_1"] == ""
    for row in rows:
        if not row["error"]:
            assert row["class_1"] in CLASS_NAMES and 1 >= float(row["prob_1"]) >= float(row["prob_2"]) > 0
    summary = json.loads((outputs[0].parent / "predictions.json").read_text())
    assert summary["num_videos"] == len(rows) and summary["num_failed"] == 1 and summary["views"] == [1, 1]
    assert [v["id"] for v in summary["videos"]] == [r["id"] for r in rows]
    log = done.stdout + done.stderr
    assert "FAILED" in log and "nested.webm" in log  # the table

    done = run_script("scripts/predict.py", *command[:-1], f"input={tmp_path}/typo", cwd=tmp_path)
    assert done.returncode != 0 and f"input={tmp_path}/typo: no such file or folder" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "ema_cfg, warned",
    [({"enabled": False}, False), ({"enabled": True}, True), (None, True)],
    ids=["run-without-ema", "ema-run-lost-its-weights", "config-unknown"],
)
def test_missing_ema_weights_warn_only_when_the_run_had_ema(caplog, ema_cfg, warned):
    state = {"model": {"w": torch.zeros(1)}, "ema": None, "config": {"trainer": {"ema": ema_cfg} if ema_cfg else {}}}
    with caplog.at_level(logging.WARNING, logger="squarefuse"):
        weights, name = select_weights(state, use_ema=True)
    assert name == "model" and weights.keys() == {"w"}
    assert ("has no EMA weights" in caplog.text) == warned


def token_cache_checkpoint(path: Path) -> Path:
    """A checkpoint of a fusion trained on a token cache (`dataset=tokens`): its backbone is `CachedTokens`."""
    cfg = compose_config(
        "train",
        [
            "dataset=tokens",
            f"dataset.root={path.parent / 'cache'}",
            "recipe=frozen_tokens",
            "fusion=temporal_conv",
            "backbone.name=vit_tiny_patch16_224",
            "backbone.img_size=32",
            "backbone.model_kwargs.embed_dim=48",
            "backbone.model_kwargs.num_prefix_tokens=1",
            "backbone.model_kwargs.has_class_token=true",
            "backbone.model_kwargs.num_tokens=5",
        ],
    )
    return make_checkpoint(path, cfg)[0]


@pytest.mark.parametrize("script", ["scripts/predict.py", "scripts/extract.py", "scripts/export.py"])
def test_a_token_cache_checkpoint_given_videos_says_what_it_takes(videos, tmp_path, script):
    ckpt = token_cache_checkpoint(tmp_path / "tokens_run" / "checkpoints" / "best.pt")
    with pytest.raises(ValueError, match=r"was trained on cached tokens .* takes those tokens, \[frames, 5, 48\]"):
        squarefuse.load_model(ckpt)
    args = [f"input={videos / 'v0.mp4'}", "device=cpu", "num_workers=0"] if "export" not in script else []
    done = run_script(script, f"ckpt={ckpt}", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: {ckpt} was trained on cached tokens" in done.stderr
    assert "python eval.py ckpt=" in done.stderr and "Traceback" not in done.stderr
