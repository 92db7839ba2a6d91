"""Failures end the job: errors exit promptly with DataLoader workers running, no process of ours
outlives a killed trainer, non-finite steps are skipped but counted and bounded, and a failing
validation keeps the epoch's checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.configs import tiny_overrides, tiny_train_config

from squarefuse.checkpoint import load_checkpoint
from squarefuse.training import loop as loop_mod
from squarefuse.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
# Generous: start-up alone takes 10-40 s on a loaded 2-core machine. Today's bug is a hang forever.
START_TIMEOUT_S = 300
# After the error is printed, the process must be gone within this (it was never, before the fix).
EXIT_AFTER_ERROR_S = 30


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_cmd(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        *tiny_overrides(data_root),
        "trainer.num_workers=2",  # persistent workers that ignore SIGTERM: the hang needs them
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def run_and_time_exit(cmd: list[str], cwd: Path, marker: str) -> tuple[int, str, float]:
    """Run `cmd`; return (exit code, output, seconds between `marker` appearing and the exit)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    seen: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if marker in line and not seen:
                seen.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while (
        proc.poll() is None
        and time.monotonic() < deadline
        and not (seen and time.monotonic() > seen[0] + EXIT_AFTER_ERROR_S)
    ):
        time.sleep(0.1)
    ended = time.monotonic()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too: they ignore SIGTERM
        proc.wait()
        reader.join(timeout=10)
        waited = ended - seen[0] if seen else -1
        pytest.fail(f"still running {waited:.0f} s after {marker!r}:\n{''.join(lines)[-3000:]}")
    reader.join(timeout=10)
    out = "".join(lines)
    assert seen, f"{marker!r} never printed:\n{out[-3000:]}"
    return proc.returncode, out, ended - seen[0]


# ------------------------------------------------------------------------------- prompt exits


@pytest.mark.slow
def test_nonfinite_stop_with_workers_exits_promptly(data_root, tmp_path):
    """The issue's reproduction: the FloatingPointError used to print and the process never exited."""
    cmd = train_cmd(data_root, tmp_path / "run", "trainer.max_steps=6", "trainer.epochs=1", "optim.lr=1e10")
    code, out, after = run_and_time_exit(cmd, tmp_path, "FloatingPointError")
    assert code != 0, out[-3000:]
    assert "non-finite loss" in out
    assert after < EXIT_AFTER_ERROR_S


@pytest.mark.slow
def test_failing_checkpoint_save_with_workers_exits_promptly(data_root, tmp_path):
    """A save that fails (here: `last.pt` is a folder, as a full disk would fail it) ends the job.

    Not an unwritable `checkpoints/`: the trainer refuses that at start-up, before any worker starts.
    """
    run = tmp_path / "run"
    (run / "checkpoints" / "last.pt").mkdir(parents=True)
    cmd = train_cmd(data_root, run, "trainer.ckpt_every=1", "trainer.epochs=1")
    code, out, after = run_and_time_exit(cmd, tmp_path, "IsADirectoryError")
    assert code != 0, out[-3000:]
    assert after < EXIT_AFTER_ERROR_S
    assert not (run / "run.lock").exists()  # released on the way out


def _children_of(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead; only its parent (now init) has to collect it


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_no_process_outlives_a_killed_trainer(data_root, tmp_path):
    """SIGKILL of the trainer: its DataLoader workers and their decoding processes follow it."""
    run = tmp_path / "run"
    # decode_timeout > 0: every worker decodes through its own guarded decoding process.
    cmd = train_cmd(data_root, run, "trainer.epochs=200", "dataset.decode_timeout=60")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        children: set[int] = set()
        while time.monotonic() < deadline and proc.poll() is None:
            children = _children_of(proc.pid)
            decoders = [p for p in children if "decoding.server" in _cmdline(p)]
            if len(children) >= 4 and len(decoders) >= 2:  # 2 workers + their 2 decoding processes
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the trainer ended early"
        assert len(decoders) >= 2, {p: _cmdline(p) for p in children}
        children = _children_of(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in children):
        time.sleep(0.1)
    survivors = {p: _cmdline(p) for p in children if _alive(p)}
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"outlived the trainer by 15 s: {survivors}"


# ---------------------------------------------------------------------------- non-finite steps


def _nan_on_calls(calls: set[int]):
    original = loop_mod.soft_cross_entropy
    count = {"n": 0}

    def loss_fn(logits, target):
        count["n"] += 1
        loss = original(logits, target)
        return loss * float("nan") if count["n"] in calls else loss

    return loss_fn


@pytest.mark.slow
def test_skipped_steps_count_and_are_logged_as_skipped(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(loop_mod, "soft_cross_entropy", _nan_on_calls({3, 4}))
    run = tmp_path / "run"
    trainer = Trainer(tiny_train_config(data_root, "trainer.nonfinite=skip", "trainer.epochs=2"), run)
    summary = trainer.fit()
    assert summary["status"] == "finished"
    # 2 epochs x 4 steps: the skipped steps count, so the run ends where it was planned to.
    state = trainer.state
    assert state.step == trainer.total_steps == 8 and state.epoch == 2 and state.num_skipped == 2
    train = {r["step"]: r for r in read_metrics(run) if r["split"] == "train"}
    assert sorted(train) == list(range(1, 9))
    for step in (3, 4):
        assert train[step]["loss"] is None and train[step]["skipped_steps"] == 1
    for step in (1, 2, 5, 6, 7, 8):
        assert isinstance(train[step]["loss"], float) and "skipped_steps" not in train[step]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 8


@pytest.mark.slow
def test_too_many_skips_in_a_row_stop_the_run(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(loop_mod, "soft_cross_entropy", _nan_on_calls(set(range(3, 1000))))
    cfg = tiny_train_config(data_root, "trainer.nonfinite=skip", "trainer.max_consecutive_skips=3", "trainer.epochs=5")
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"4 steps in a row \(steps 3 to 6.*max_consecutive_skips=3"):
        trainer.fit()
    assert trainer.state.step == 6 and trainer.state.num_skipped == 4
    assert not (tmp_path / "run" / "run.lock").exists()


def test_max_consecutive_skips_is_validated(data_root, tmp_path):
    with pytest.raises(ValueError, match="trainer.max_consecutive_skips must be >= 1, got 0"):
        Trainer(tiny_train_config(data_root, "trainer.max_consecutive_skips=0"), tmp_path / "run")


def test_nonfinite_validation_never_becomes_best(data_root, tmp_path, monkeypatch):
    real_evaluate = loop_mod.evaluate

    def nan_validation(*args, **kwargs):
        # What NaN weights give: a NaN loss, yet an argmax and so a top-1 (here a perfect one).
        result = real_evaluate(*args, **kwargs)
        result.metrics.update(loss=float("nan"), top1=100.0)
        return result

    monkeypatch.setattr(loop_mod, "evaluate", nan_validation)
    run = tmp_path / "run"
    trainer = Trainer(tiny_train_config(data_root, "trainer.epochs=1"), run)
    trainer.fit()
    assert not (run / "checkpoints" / "best.pt").exists()
    assert trainer.state.best_top1 == float("-inf")
    assert [r["loss"] for r in read_metrics(run) if r["split"] == "val_clip"] == ["nan"]


# ------------------------------------------------------------------------ failing validation


@pytest.mark.slow
def test_failing_validation_keeps_the_epoch_checkpoint_and_reruns(data_root, tmp_path, monkeypatch):
    real_evaluate = loop_mod.evaluate

    def every_video_fails(*args, **kwargs):
        raise ValueError("no video of the split could be decoded")

    monkeypatch.setattr(loop_mod, "evaluate", every_video_fails)
    run = tmp_path / "run"
    cfg = tiny_train_config(data_root, "trainer.epochs=2")
    with pytest.raises(ValueError, match="no video"):
        Trainer(cfg, run).fit()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 1, 0)  # the epoch is kept

    # Rerun once validation works again: the missed validation runs first, then training goes on.
    monkeypatch.setattr(loop_mod, "evaluate", real_evaluate)
    summary = Trainer(cfg, run).fit()
    assert summary["status"] == "finished" and summary["step"] == 8
    val_steps = [r["step"] for r in read_metrics(run) if r["split"] == "val_clip"]
    assert val_steps == [4, 8]
    assert (run / "checkpoints" / "best.pt").is_file()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["last_val_step"] == 8
