"""Two processes on CPU (gloo) under torchrun: training parity, exact eval, resume, one run folder.

Every subprocess has a timeout, so a distributed hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers.scripts import run_script, torchrun

from squarefuse.checkpoint import load_checkpoint
from squarefuse.datasets.synthetic import ensure_synthetic

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TIMEOUT = 300


@pytest.fixture(scope="module")
def list_data(tmp_path_factory) -> Path:
    """Synthetic videos as a `list` dataset whose val list has an odd number of videos (7)."""
    root = tmp_path_factory.mktemp("ddp_data")
    splits = ensure_synthetic(
        root,
        task="direction",
        seed=0,
        train_per_class=2,
        val_per_class=1,
        test_per_class=1,
        size=64,
        num_frames=8,
        fps=8,
    )
    val_lines = splits.val_list.read_text().splitlines()
    (root / "val_odd.txt").write_text("\n".join(val_lines[:7]) + "\n")
    return root


def overrides(root: Path, *extra: str) -> list[str]:
    return [
        "dataset=list",
        "backbone=tiny",
        f"dataset.root={root}",
        f"dataset.val_file={root}/val_odd.txt",
        f"dataset.label_map={root}/classes.txt",
        "dataset.sampling=segment",
        "dataset.num_frames=4",
        "dataset.hflip=false",
        "dataset.randaug_n=0",
        "dataset.random_erasing=0",
        "dataset.repeated_aug=1",
        "dataset.max_missing_fraction=0",
        "dataset.test_clips=1",
        "dataset.test_crops=1",
        "backbone.img_size=32",
        "backbone.model_kwargs.depth=2",
        "backbone.model_kwargs.embed_dim=48",
        "backbone.drop_path_rate=0",
        "backbone.pretrained=false",
        "fusion.K=4",
        "trainer.mixup=0",
        "trainer.cutmix=0",
        "trainer.num_workers=1",
        "trainer.device=cpu",
        "trainer.precision=fp32",
        "trainer.log_every=1",
        "trainer.epochs=2",
        *extra,
    ]


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


def ddp_args(root: Path) -> list[str]:
    """The 2-process run of `ddp_run`, and of the resume test's cut run that must end where it ends."""
    return overrides(root, "trainer.batch_size=4", "trainer.epochs=8")


def single(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """One process, as `OMP_NUM_THREADS=1 python SCRIPT ARGS`, run in this one (helpers/scripts.py)."""
    out = run_script(script, *args, cwd=cwd, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(list_data, tmp_path_factory) -> Path:
    """One 2-process run (2 x 4 clips a step, 8 epochs, 16 steps) that two tests compare against.

    Started without hydra.run.dir: the ranks must agree on one timestamped folder themselves.
    Each torchrun costs three interpreters that import torch (~10 s each on 2 cores), so the
    parity test and the resume test share this run instead of making one each.
    """
    cwd = tmp_path_factory.mktemp("ddp")
    run(torchrun("train.py", *ddp_args(list_data)), cwd)
    run_dirs = [p.parent for p in (cwd / "runs").glob("*/*/metrics.jsonl")]
    assert len(run_dirs) == 1, list((cwd / "runs").rglob("*"))
    assert len(list((cwd / "runs").glob("*/*"))) == 1  # only rank 0 made a folder
    return run_dirs[0]


def test_two_process_training_matches_one_process_and_writes_one_run_folder(list_data, ddp_run, tmp_path):
    # Same global batch (8): one process x 8 clips, two processes x 4 clips.
    args = overrides(list_data, "trainer.batch_size=8", "trainer.epochs=8")
    single("train.py", *args, f"hydra.run.dir={tmp_path}/one", cwd=tmp_path)

    train_steps = [r["step"] for r in metrics(ddp_run) if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)), "a step was logged twice"

    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    two = load_checkpoint(ddp_run / "checkpoints" / "last.pt")
    assert one["step"] == two["step"] == 16
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    one_val = [r for r in metrics(tmp_path / "one") if r["split"] == "val_clip"]
    two_val = [r for r in metrics(ddp_run) if r["split"] == "val_clip"]
    assert [r["num_videos"] for r in two_val] == [r["num_videos"] for r in one_val] == [7] * 8
    for a, b in zip(one_val, two_val, strict=True):
        assert a["top1"] == pytest.approx(b["top1"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-4)

    # Multi-view eval of the checkpoint: same metrics with 1 and 2 processes, 7 videos each counted once.
    ckpt = ddp_run / "checkpoints" / "last.pt"
    eval_args = [f"ckpt={ckpt}", "dataset.test_clips=2", "dataset.test_crops=3", "num_workers=1", "device=cpu"]
    single("eval.py", *eval_args, f"hydra.run.dir={tmp_path}/eval1", cwd=tmp_path)
    run(torchrun("eval.py", *eval_args, f"hydra.run.dir={tmp_path}/eval2"), tmp_path)
    r1 = json.loads((tmp_path / "eval1" / "results.json").read_text())
    r2 = json.loads((tmp_path / "eval2" / "results.json").read_text())
    assert r1["num_videos"] == r2["num_videos"] == 7
    for key in ("top1", "topk_acc", "mean_class_acc"):
        assert r1[key] == pytest.approx(r2[key])
    rows = (tmp_path / "eval2" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 7


def test_ddp_resume_after_sigterm_is_exact(list_data, ddp_run, tmp_path):
    # The uninterrupted run is `ddp_run`: the same overrides, started without a folder of its own.
    cut = tmp_path / "cut"
    cmd = torchrun("train.py", *ddp_args(list_data), f"hydra.run.dir={cut}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        lines = (cut / "metrics.jsonl").read_text().splitlines() if (cut / "metrics.jsonl").exists() else []
        if sum('"train"' in line for line in lines) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    out, _ = proc.communicate(timeout=TIMEOUT)
    stopped = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert 3 <= stopped["step"] < 16, out[-3000:]
    assert len(stopped["rng"]) == 2  # both ranks' RNG states, so each resumes its own stream

    run(cmd, tmp_path)
    full_state = load_checkpoint(ddp_run / "checkpoints" / "last.pt")
    cut_state = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert full_state["step"] == cut_state["step"] == 16  # 16 videos / (4 x 2 ranks) x 8 epochs
    for key, value in full_state["model"].items():
        torch.testing.assert_close(cut_state["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    full_losses = {r["step"]: r["loss"] for r in metrics(ddp_run) if r["split"] == "train"}
    cut_losses = {r["step"]: r["loss"] for r in metrics(cut) if r["split"] == "train"}
    assert cut_losses.keys() == full_losses.keys()
    for step, loss in full_losses.items():
        assert cut_losses[step] == pytest.approx(loss, rel=1e-5), step


def test_resume_of_two_ranks_as_one_is_refused_naming_both_world_sizes(list_data, ddp_run, tmp_path):
    # Resumed by 1 process, a 2-process checkpoint used to skip to the next epoch and rebuild its
    # lr schedule counting the steps done: trained past trainer.epochs (issue 28, item 7).
    checkpoint = tmp_path / "two_ranks.pt"
    shutil.copy(ddp_run / "checkpoints" / "last.pt", checkpoint)
    resume = [f"trainer.resume={checkpoint}", "trainer.epochs=10", f"hydra.run.dir={tmp_path}/one"]
    done = run_script("train.py", *ddp_args(list_data), *resume, cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"error: {checkpoint} was saved by a run of world size 2 (global batch 4 x 1 x 2 = 8 " in done.stderr
    assert "this run has world size 1 (global batch 4)" in done.stderr
    assert f"trainer.init_from={checkpoint}" in done.stderr
    assert not (tmp_path / "one").exists()  # nothing started: the folder Hydra made is removed
