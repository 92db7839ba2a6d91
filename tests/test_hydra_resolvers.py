"""One run folder per job and rank-0-only Hydra files, from the launcher's environment alone."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers.scripts import torchrun
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from squarefuse.config import resolvers
from squarefuse.config.output_dirs import default_eval_dir, eval_suffix
from squarefuse.config.resolvers import OWNER_FILE, STAMP_FORMAT, launch_dir, launch_stamp, register_resolvers

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "GROUP_WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SUBMITIT_EXECUTOR")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture
def bare_env(monkeypatch):
    """No launcher variables: a single process, whatever shell the tests run in."""
    for name in LAUNCH_VARS + SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def same_second(monkeypatch):
    """Every clock reading formats as one second: jobs that start together, however fast the test."""
    monkeypatch.setattr(resolvers.time, "strftime", lambda fmt, t=None: "2026-12-02/09-31-05")


def _compose_hydra(config_name: str, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True).hydra


def test_single_process_stamp_is_the_current_time(bare_env):
    before = time.strftime("%Y-%m-%d/%H-%M-%S")
    stamp = launch_stamp()
    assert before <= stamp <= time.strftime("%Y-%m-%d/%H-%M-%S")


def test_the_run_folder_resolvers_import_no_torch():
    # Every rank of a launch names its folder with them while Hydra composes; the processes of the
    # tests below start in ~0.1 s instead of ~2 s (squarefuse/runtime/launch_env.py).
    code = "import sys, squarefuse.config.resolvers; print([m for m in ('torch', 'timm') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_ranks_started_at_different_times_by_one_torchrun_agree():
    # Two "ranks" of one torchrun: children of this process (their agent), started > 1 s apart.
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "none", "GROUP_WORLD_SIZE": "1", "PYTHONPATH": str(REPO)}
    code = "from squarefuse.config.resolvers import launch_stamp; print(launch_stamp())"
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
    OmegaConf.register_new_resolver("checkpoint_dir", lambda ckpt, subdir, suffix="": "out", replace=True)
    OmegaConf.register_new_resolver("eval_suffix", eval_suffix, replace=True)

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


def test_eval_jobs_started_in_the_same_second_get_their_own_folders(bare_env, same_second, tmp_path):
    # The issue: eval.py with frame_order=normal|reversed|shuffled started together wrote one folder.
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.touch()
    folders = [Path(default_eval_dir(str(ckpt))) for _ in range(3)]
    eval_dir = tmp_path / "run" / "eval"
    assert folders == [
        eval_dir / "2026-12-02_09-31-05",
        eval_dir / "2026-12-02_09-31-05_2",
        eval_dir / "2026-12-02_09-31-05_3",
    ]
    assert all(f.is_dir() for f in folders)  # created now, so the next job cannot take it


@pytest.mark.parametrize(
    "overrides, name",
    [
        ([], "2026-12-02_09-31-05"),
        (["frame_order=reversed"], "2026-12-02_09-31-05_reversed"),
        (["split=test", "dataset.test_clips=5", "dataset.test_crops=3"], "2026-12-02_09-31-05_test_5x3"),
        (["frame_order=shuffled", "frame_order_seed=3", "use_ema=false"], "2026-12-02_09-31-05_shuffled-seed3_noema"),
        (["dataset.test_clips=4", "dataset.num_frames=16"], "2026-12-02_09-31-05_4clips_16f"),
        (["split=my split/../x"], "2026-12-02_09-31-05_my-split-..-x"),  # one safe folder, no path
    ],
)
def test_eval_folders_name_their_non_default_choices(bare_env, same_second, tmp_path, overrides, name):
    from squarefuse.apps.checkpoint_dir import register_checkpoint_dir_resolver  # noqa: PLC0415 - app layer

    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"step": 1}, ckpt)
    register_resolvers()
    register_checkpoint_dir_resolver("usage")
    hydra_cfg = _compose_hydra("eval", [f"ckpt={ckpt}", *overrides])
    assert Path(hydra_cfg.run.dir) == tmp_path / "run" / "eval" / name
    # A second job in the same second with the same choices: the suffix, then _2.
    assert Path(default_eval_dir(str(ckpt), suffix=name[len("2026-12-02_09-31-05") :])).name == f"{name}_2"


def test_train_jobs_started_in_the_same_second_get_their_own_folders(bare_env, same_second, tmp_path, monkeypatch):
    # The issue: two train.py got one runs/<date>/<time>/ and the second Hydra overwrote the first's
    # .hydra/overrides.yaml before the run lock refused it.
    monkeypatch.chdir(tmp_path)
    register_resolvers()
    first, second = _compose_hydra("train", ["trainer.seed=0"]), _compose_hydra("train", ["trainer.seed=1"])
    assert first.run.dir == "runs/2026-12-02/09-31-05" and second.run.dir == "runs/2026-12-02/09-31-05_2"
    assert first.sweep.dir == "multirun/2026-12-02/09-31-05" and second.sweep.dir == "multirun/2026-12-02/09-31-05_2"


def test_claims_of_one_folder_raced_by_two_launches(tmp_path):
    # Threads of two launches ("a": say both ranks of one torchrun, "b": another job) claim one name at
    # once: exactly one launch owns it, and every thread of that launch (none of the other) is told so.
    path = tmp_path / "09-31-05"
    start = threading.Barrier(8)
    answers: dict[str, list[bool]] = {"a": [], "b": []}

    def claim(owner: str) -> None:
        start.wait()
        answers[owner].append(resolvers._claim(path, owner))

    threads = [threading.Thread(target=claim, args=(owner,)) for owner in "abababab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = (path / OWNER_FILE).read_text().strip()
    loser = "b" if winner == "a" else "a"
    assert answers[winner] == [True] * 4 and answers[loser] == [False] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["09-31-05"]  # no temporary folders left behind


@pytest.mark.slow
def test_torchrun_ranks_agree_on_a_folder_past_another_jobs(bare_env, tmp_path):
    # Two "ranks" of one torchrun (children of this process, their agent) whose launch second another
    # job has taken already: both move on to the same <time>_2, and a separate job to yet another.
    stamp = time.strftime(STAMP_FORMAT, time.localtime(resolvers._process_start_time(os.getpid())))
    taken = tmp_path / stamp
    taken.mkdir(parents=True)
    (taken / OWNER_FILE).write_text("another job\n")
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "none", "GROUP_WORLD_SIZE": "1", "PYTHONPATH": str(REPO)}
    code = f"from squarefuse.config.resolvers import launch_dir; print(launch_dir({str(tmp_path)!r}))"
    folders = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        folders.append(done.stdout.strip())
    assert folders == [f"{taken}_2"] * 2
    assert (taken / OWNER_FILE).read_text() == "another job\n"
    alone = launch_dir(str(tmp_path))  # this process, not under torchrun
    assert alone not in (str(taken), f"{taken}_2")


def test_folders_named_by_the_scheduler_are_not_claimed(bare_env, tmp_path):
    # A requeued SLURM job must find its folder again to resume in it.
    bare_env.setenv("SLURM_JOB_ID", "123")
    bare_env.setenv("SLURM_PROCID", "0")
    bare_env.setenv("SLURM_NTASKS", "2")
    assert launch_dir(str(tmp_path)) == launch_dir(str(tmp_path)) == str(tmp_path / "slurm-123")


@pytest.mark.slow
def test_two_torchruns_started_together_get_one_folder_each(tmp_path):
    # Real torchrun agents, two ranks each, started at once: each job's ranks agree, the jobs differ.
    script = tmp_path / "where.py"
    script.write_text(
        f"from squarefuse.config.resolvers import launch_dir\nprint('FOLDER', launch_dir({str(tmp_path / 'runs')!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in LAUNCH_VARS + SLURM_VARS:
        env.pop(name, None)
    command = torchrun(script)
    jobs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in "ab"
    ]
    outputs = [job.communicate(timeout=120)[0] for job in jobs]
    folders = []
    for job, out in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, out
        ranks = {line.split()[1] for line in out.splitlines() if line.startswith("FOLDER")}
        assert len(ranks) == 1, out  # both ranks of one torchrun: one folder
        folders += ranks
    assert len(set(folders)) == 2 and all(Path(f).is_dir() for f in folders)


def test_sweep_folders_are_named_by_what_each_job_sweeps(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    task = ["dataset.root=/data/x", "fusion=none,square", "trainer.seed=0,1", "+dataset.test_file=/a/b.json"]
    OmegaConf.save({"hydra": {"overrides": {"task": task}}}, sweep / "multirun.yaml")
    job = ["dataset.root=/data/x", "fusion=none", "trainer.seed=1", "+dataset.test_file=/a/b.json"]
    assert resolvers.sweep_subdir(1, job, str(sweep)) == "1_fusion-none_seed-1"
    # A swept path cannot nest folders; a long name is cut, the job number keeps it unique.
    OmegaConf.save(
        {"hydra": {"overrides": {"task": ["dataset.root=/d/a,/d/b", "optim.lr=0.1,0.2"]}}}, sweep / "multirun.yaml"
    )
    name = resolvers.sweep_subdir(12, ["dataset.root=/data/" + "x" * 80, "optim.lr=0.1"], str(sweep))
    assert name.startswith("12_root-data-xxx") and "/" not in name and len(name) == len("12_") + 60
    assert resolvers.sweep_subdir(0, [], str(sweep)) == "0"
    assert resolvers.sweep_subdir(3, ["a=1"], str(tmp_path / "no_multirun_yaml")) == "3_a-1"
    # Keys that share their last part keep their whole name; quotes, brackets and spaces go.
    OmegaConf.save(
        {"hydra": {"overrides": {"task": ["optim.lr=1,2", "+head.lr=3,4", "x='a b',c"]}}}, sweep / "multirun.yaml"
    )
    name = resolvers.sweep_subdir(5, ["optim.lr=1", "+head.lr=3", "x='a b'"], str(sweep))
    assert name == "5_optim.lr-1_head.lr-3_x-a-b"


def test_sweep_folder_paths_pass_to_the_apps_unquoted(tmp_path):
    """Whatever a sweep varies, `ckpt=<its job folder>/checkpoints/best.pt` parses as one plain value."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    values = ["/d/a b", "x=1,y=[2]", "'q'", '"{k: v}"', "(1)", "a\\tb", "~/p+q:r@s%t"]
    task = ["fusion=a,b", f"dataset.root={','.join(repr(v) for v in values)}"]
    OmegaConf.save({"hydra": {"overrides": {"task": task}}}, sweep / "multirun.yaml")
    parser = OverridesParser.create()
    for num, value in enumerate(values):
        name = resolvers.sweep_subdir(num, ["fusion=a", f"dataset.root={value!r}"], str(sweep))
        path = f"multirun/2026-12-07/10-00-00/{name}/checkpoints/best.pt"
        (override,) = parser.parse_overrides([f"ckpt={path}"])
        assert override.value() == path, name
