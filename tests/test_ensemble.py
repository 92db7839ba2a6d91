"""Ensembles of eval.py outputs (squarefuse.evaluation.ensemble, scripts/ensemble.py)."""

from __future__ import annotations

import hashlib
import json
import re
import runpy
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoints import eval_cfg, tiny_train_cfg
from helpers.scripts import run_script
from helpers.videos import write_video
from omegaconf import OmegaConf

from squarefuse.apps.evaluate import run_eval
from squarefuse.checkpoint import save_checkpoint
from squarefuse.config import resolvers
from squarefuse.evaluation.ensemble import read_eval_dir, run_ensemble
from squarefuse.models import build_classifier

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["push", "pull", "spin"]
LABELS = [0, 1, 2, 0, 1]
CORRUPT = 3  # v3.mp4 does not decode: every eval lists it as failed


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for i in range(len(LABELS)):
        if i == CORRUPT:
            (root / f"v{i}.mp4").write_text("not a video\n")
        else:
            write_video(root / f"v{i}.mp4", frames=rng.integers(0, 256, size=(8, 32, 40, 3), dtype=np.uint8), fps=8)
    lines = "".join(f"v{i}.mp4 {label}\n" for i, label in enumerate(LABELS))
    for split in ("train", "val"):
        (root / f"{split}.txt").write_text(lines)
    (root / "test.txt").write_text("v0.mp4 0\nv1.mp4 1\nv4.mp4 1\n")  # v2 left out
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASS_NAMES))
    return root


def make_checkpoint(path: Path, root: Path, seed: int) -> Path:
    cfg = tiny_train_cfg(root, "dataset.fallback_decoder=null")
    torch.manual_seed(seed)
    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=len(CLASS_NAMES))
    state = {
        "model": model.state_dict(),
        "ema": None,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": CLASS_NAMES,
        "step": seed,
    }
    return save_checkpoint(state, path)


def evaluate_to(folder: Path, ckpt: Path, *overrides: str) -> Path:
    run_eval(eval_cfg(ckpt, *overrides), folder)
    return folder


@pytest.fixture(scope="module")
def evals(tmp_path_factory, data_root) -> dict[str, Path]:
    """Two models evaluated on the val split, and model a on a test split without v2."""
    base = tmp_path_factory.mktemp("evals")
    ckpt_a = make_checkpoint(base / "a.pt", data_root, seed=0)
    ckpt_b = make_checkpoint(base / "b.pt", data_root, seed=1)
    return {
        "a": evaluate_to(base / "a", ckpt_a),
        "b": evaluate_to(base / "b", ckpt_b, "dataset.test_clips=2"),
        "a_test": evaluate_to(base / "a_test", ckpt_a, "split=test", f"+dataset.test_file={data_root}/test.txt"),
    }


def test_an_eval_ensembled_with_itself_equals_it(evals, tmp_path):
    result = run_ensemble([evals["a"], evals["a"]], out_dir=tmp_path / "self")
    original = read_eval_dir(evals["a"])
    assert torch.equal(result.probs, original.probs) and torch.equal(result.indices, original.indices)
    for name in ("predictions.csv", "per_class.csv"):
        assert (tmp_path / "self" / name).read_text() == (evals["a"] / name).read_text(), name
    mine = json.loads((tmp_path / "self" / "results.json").read_text())
    theirs = json.loads((evals["a"] / "results.json").read_text())
    for key in ("top1", "topk_acc", "mean_class_acc", "loss", "num_videos", "num_failed", "failed_videos", "views"):
        assert mine[key] == theirs[key], key
    assert theirs["num_failed"] == 1 and theirs["failed_videos"][0]["id"] == f"v{CORRUPT}.mp4"
    assert [m["weight"] for m in mine["ensemble"]] == [1.0, 1.0]
    assert (tmp_path / "self" / "confusion_matrix.png").is_file()
    # eval.py's results.json carries the model's size (params and FLOPs per clip).
    assert theirs["model_info"]["num_frames"] == 4 and theirs["model_info"]["flops_per_clip"]["total"] > 0


def test_weighted_ensemble_through_the_script(evals, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ab"
    script = REPO / "scripts" / "ensemble.py"
    argv = [str(script), str(evals["a"]), str(evals["b"]), "--weights", "2", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    a, b, ab = read_eval_dir(evals["a"]), read_eval_dir(evals["b"]), read_eval_dir(out)
    assert not torch.allclose(a.probs, b.probs)
    torch.testing.assert_close(ab.probs, (2 * a.probs + b.probs) / 3)
    top1 = 100.0 * (ab.probs.argmax(1) == ab.labels).double().mean().item()
    assert ab.summary["top1"] == pytest.approx(top1)
    assert [m["views"]["clips"] for m in ab.summary["ensemble"]] == [1, 2]

    # Nothing is overwritten: one error line, exit 2.
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code == 2 and "already holds results.json" in capsys.readouterr().err


def test_default_output_folders_are_unique_and_git_ignored(evals, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resolvers.time, "strftime", lambda fmt, t=None: "2026-12-02/10-00-00")
    for _ in range(2):  # two ensembles in the same second: the second does not overwrite or fail
        run_ensemble([evals["a"], evals["b"]])
    folders = sorted(p.name for p in (tmp_path / "ensembles").iterdir())
    assert folders == ["2026-12-02_10-00-00", "2026-12-02_10-00-00_2"]
    assert all((tmp_path / "ensembles" / f / "results.json").is_file() for f in folders)
    assert "ensembles/" in (REPO / ".gitignore").read_text().splitlines()


def test_evaluations_of_other_videos_or_classes_are_refused(evals, tmp_path):
    with pytest.raises(ValueError, match=r"video 'v2\.mp4' of .*/a is not in .*a_test"):
        run_ensemble([evals["a"], evals["a_test"]], out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match=r"video 'v2\.mp4' of .*/a is not in .*a_test"):
        run_ensemble([evals["a_test"], evals["a"]], out_dir=tmp_path / "x")

    def rename_class(saved):
        saved["class_names"] = ["push", "pull", "turn"]

    renamed = changed_copy(evals["a"], tmp_path / "renamed", rename_class)
    with pytest.raises(ValueError, match=r"differ in class 2: 'turn' vs 'spin'"):
        run_ensemble([evals["a"], renamed], out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="2 weights for 3"):
        run_ensemble([evals["a"]] * 3, weights=[1, 1], out_dir=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="probs.pt"):
        run_ensemble([evals["a"], tmp_path], out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- damaged files


def changed_copy(folder: Path, to: Path, change, *, record_sha256: bool = True) -> Path:
    """A copy of an eval folder whose probs.pt is changed by `change(saved)`; its results.json records the
    new file's sha256, as eval.py would have, or none (`record_sha256=False`: a folder of an older version)."""
    shutil.copytree(folder, to)
    saved = torch.load(to / "probs.pt", weights_only=True)
    change(saved)
    torch.save(saved, to / "probs.pt")
    summary = json.loads((to / "results.json").read_text())
    summary["probs_sha256"] = hashlib.sha256((to / "probs.pt").read_bytes()).hexdigest()
    if not record_sha256:
        del summary["probs_sha256"]
    (to / "results.json").write_text(json.dumps(summary))
    return to


def flip_exponent_bit(path: Path) -> None:
    """Flip a bit of the first probability's exponent: what a bad disk or copy does; the zip stays valid."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)  # probs
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 3] ^= (
        0x01  # float32, little-endian: byte 3 holds the exponent
    )
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("record_sha256", [True, False], ids=["sha256", "older-folder"])
def test_a_damaged_probs_file_is_refused_naming_it(evals, tmp_path, record_sha256):
    redo = "evaluate the checkpoint again into a new folder (eval.py)"
    kept = changed_copy(evals["a"], tmp_path / "kept", lambda saved: None, record_sha256=record_sha256)
    assert torch.equal(read_eval_dir(kept).probs, read_eval_dir(evals["a"]).probs)

    flipped = changed_copy(evals["a"], tmp_path / "flipped", lambda saved: None, record_sha256=record_sha256)
    flip_exponent_bit(flipped / "probs.pt")
    # What made the check necessary: the flipped file loads without a word, a probability above 1.
    assert torch.load(flipped / "probs.pt", weights_only=True)["probs"].max() > 1
    found = "its sha256 differs" if record_sha256 else "is damaged: .*/data/2 does not match the CRC-32"
    with pytest.raises(ValueError, match=rf"{flipped}/probs.pt .*{found}.*{re.escape(redo)}"):
        run_ensemble([evals["a"], flipped], out_dir=tmp_path / "x")

    whole = (evals["a"] / "probs.pt").read_bytes()
    for name, data in (("truncated", whole[: len(whole) // 2]), ("empty", b"")):
        damaged = changed_copy(evals["a"], tmp_path / name, lambda saved: None, record_sha256=record_sha256)
        (damaged / "probs.pt").write_bytes(data)
        found = "its sha256 differs" if record_sha256 else f"is empty or truncated \\({len(data)} bytes"
        with pytest.raises(ValueError, match=rf"{damaged}/probs.pt .*{found}.*{re.escape(redo)}"):
            run_ensemble([evals["a"], damaged], out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_probabilities_that_are_not_a_distribution_are_refused_naming_the_video(evals, tmp_path):
    # Files whose sha256 matches (rewritten with results.json, or from an older version): their values decide.
    def scale_first_row(saved):
        saved["probs"][0] *= 5

    scaled = changed_copy(evals["a"], tmp_path / "scaled", scale_first_row)
    with pytest.raises(ValueError, match=r"probabilities of video 'v0.mp4' are not a distribution .* sum 5"):
        run_ensemble([evals["a"], scaled], out_dir=tmp_path / "x")

    def nan_row(saved):
        saved["probs"][2] = float("nan")  # what an eval.py before the NaN check wrote (without a sha256)

    nan = changed_copy(evals["a"], tmp_path / "nan", nan_row, record_sha256=False)
    with pytest.raises(ValueError, match=r"the probabilities of 1 videos are NaN or infinite \('v2.mp4'\)"):
        run_ensemble([evals["a"], nan], out_dir=tmp_path / "x")

    def other_label(saved):
        saved["labels"][1] = 0

    relabelled = changed_copy(evals["a"], tmp_path / "relabelled", other_label)
    with pytest.raises(ValueError, match=r"the label of video 'v1.mp4' differs from predictions.csv"):
        run_ensemble([evals["a"], relabelled], out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()

    done = run_script("scripts/ensemble.py", str(evals["a"]), str(nan), "--out", str(tmp_path / "y"), cwd=tmp_path)
    assert done.returncode != 0 and "error: " in done.stderr and "NaN or infinite" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "y").exists()
