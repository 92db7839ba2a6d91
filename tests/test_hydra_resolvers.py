"""One run folder per job and rank-0-only Hydra files, from the launcher's environment alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from squarefuse.engine.hydra_resolvers import launch_stamp, register_resolvers

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "GROUP_WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SUBMITIT_EXECUTOR")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture
def bare_env(monkeypatch):
    """No launcher variables: a single process, whatever shell the tests run in."""
    for name in LAUNCH_VARS + SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_stamp_is_the_current_time(bare_env):
    before = time.strftime("%Y-%m-%d/%H-%M-%S")
    stamp = launch_stamp()
    assert before <= stamp <= time.strftime("%Y-%m-%d/%H-%M-%S")


def test_ranks_started_at_different_times_by_one_torchrun_agree():
    # Two "ranks" of one torchrun: children of this process (their agent), started > 1 s apart.
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "none", "GROUP_WORLD_SIZE": "1", "PYTHONPATH": str(REPO)}
    code = "from squarefuse.engine.hydra_resolvers import launch_stamp; print(launch_stamp())"
    stamps = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        stamps.append(done.stdout.strip())
        time.sleep(1.1)
    assert stamps[0] == stamps[1]
    assert stamps[0] < time.strftime("%Y-%m-%d/%H-%M-%S")  # the agent's start, not the ranks'


def test_torchrun_on_several_nodes_uses_the_rendezvous_id(bare_env):
    bare_env.setenv("GROUP_WORLD_SIZE", "2")
    bare_env.setenv("TORCHELASTIC_RUN_ID", "job42")
    assert launch_stamp() == "torchrun-job42"
    bare_env.setenv("TORCHELASTIC_RUN_ID", "none")  # static rendezvous without --rdzv-id
    with pytest.raises(ValueError, match="--rdzv-id.*hydra.run.dir"):
        launch_stamp()


def test_slurm_tasks_without_torchrun_use_the_job_id(bare_env):
    bare_env.setenv("SLURM_JOB_ID", "123")
    bare_env.setenv("SLURM_PROCID", "1")
    bare_env.setenv("SLURM_NTASKS", "4")
    bare_env.setenv("SLURM_STEP_ID", "0")
    assert launch_stamp() == "slurm-123"  # as scripts/slurm/train.sbatch: a requeued job resumes
    bare_env.setenv("SLURM_STEP_ID", "2")
    assert launch_stamp() == "slurm-123.2"  # a later step of the allocation: a run of its own
    bare_env.setenv("SLURM_NTASKS", "1")  # one task (e.g. python train.py inside salloc): a timestamp
    assert launch_stamp().count("/") == 1


@pytest.mark.parametrize("config_name", ["train", "eval"])
def test_only_rank_zero_writes_hydra_files(bare_env, config_name):
    register_resolvers()
    OmegaConf.register_new_resolver("checkpoint_dir", lambda ckpt, subdir: "out", replace=True)

    def hydra_cfg():
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose(
                config_name=config_name, overrides=["ckpt=x.pt"] * (config_name == "eval"), return_hydra_config=True
            )
        cfg.hydra.runtime.output_dir = "/run"
        cfg.hydra.job.name = "job"
        return cfg.hydra

    rank0 = hydra_cfg()
    assert rank0.output_subdir == ".hydra"
    assert rank0.job_logging.handlers.file.filename == "/run/job.log" and rank0.job_logging.root.level == "INFO"

    bare_env.setenv("RANK", "1")
    bare_env.setenv("WORLD_SIZE", "2")
    rank1 = hydra_cfg()
    assert rank1.output_subdir is None
    assert rank1.job_logging.handlers.file.filename == os.devnull and rank1.job_logging.root.level == "ERROR"
    assert rank1.hydra_logging.root.level == "ERROR"
