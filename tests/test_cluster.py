"""Sweeps and the SLURM requeue path, exercised for real with submitit's local executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.configs import CONFIG_DIR, compose_config, tiny_overrides
from helpers.scripts import run_script
from hydra import compose, initialize_config_dir

from squarefuse.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TIMEOUT = 300


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["split"] == "train"]


def test_slurm_launcher_preset_composes():

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.nodes=2",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.account=lab",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.timeout_min=60",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.partition, launcher.account, launcher.timeout_min) == (2, "gpu", "lab", 60)
    assert launcher.tasks_per_node == 4  # one task per GPU
    assert compose_config("train", []).trainer is not None


@pytest.mark.slow
def test_local_sweep_runs_every_value(tmp_path):
    data = tmp_path / "data"
    args = [
        "-m",
        *tiny_overrides(data),
        "trainer.max_steps=2",
        "trainer.val_every=0",
        "fusion.K=2,4",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    out = run_script("train.py", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for job, k in ((0, 2), (1, 4)):
        # Named by what the job sweeps, not by the overrides every job shares.
        state = load_checkpoint(tmp_path / "sweep" / f"{job}_K-{k}" / "checkpoints" / "last.pt")
        assert state["config"]["fusion"]["K"] == k and state["step"] == 2


def _submitit_task_pids(marker: str) -> list[int]:
    """PIDs of submitit task processes whose command line mentions `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmdline and marker in cmdline:
            pids.append(int(proc.name))
    return pids


def test_preempted_submitit_job_checkpoints_requeues_and_resumes(tmp_path):
    data = tmp_path / "data"
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        *tiny_overrides(data),
        "trainer.epochs=10",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = sweep / "0"  # nothing swept: the job number alone
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(train_steps(run_dir)) >= 3):
        time.sleep(0.1)
    pids = _submitit_task_pids(str(sweep))
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGUSR2)  # what SLURM sends before preemption / the time limit
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-4000:]

    logs = "\n".join(p.read_text() for p in [*sweep.glob(".submitit/*/*_log.*"), *run_dir.glob("*.log")])
    assert "Requeued" in logs or "requeue" in logs.lower(), logs[-3000:]
    assert "resumed from" in logs, logs[-3000:]
    steps = train_steps(run_dir)
    assert steps == list(range(1, 10 * 4 + 1)), steps  # every step once: nothing lost, nothing redone
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 40
