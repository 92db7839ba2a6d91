"""Config resolvers that read the launcher's environment, so that every rank composes the same run.

Each rank of a torchrun or SLURM job composes its own config. `${launch_stamp:}` names the run
folder alike on every rank from what the launcher gives all of them (no process group is needed
before Hydra starts), and `${if_rank_zero:A,B}` lets configs keep the other ranks from writing
Hydra's files (configs/hydra/job_logging/rank_zero.yaml, `hydra.output_subdir`).

Call `register_resolvers()` before `@hydra.main` composes the config (train.py, eval.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

from omegaconf import OmegaConf

from squarefuse.engine.distributed import env_dist_info

STAMP_FORMAT = "%Y-%m-%d/%H-%M-%S"


def _process_start_time(pid: int) -> float:
    """Unix time at which process `pid` started, from Linux's /proc."""
    with open(f"/proc/{pid}/stat") as f:
        # Field 22 (starttime, clock ticks after boot); the command name (field 2) may hold spaces.
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot_time = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot_time + start_ticks / os.sysconf("SC_CLK_TCK")


def launch_stamp() -> str:
    """This job's run-folder name, computed alike on every rank without communicating.

    - torchrun on one node: the start time of the torchrun process (the parent of every rank), as
      `%Y-%m-%d/%H-%M-%S`; ranks it restarts (`--max-restarts`) get the same folder and resume.
    - torchrun on several nodes: `torchrun-<rdzv id>`, the one value all nodes share.
    - several SLURM tasks started without torchrun (`srun python train.py`): `slurm-<job id>` (as in
      scripts/slurm/train.sbatch, so a requeued job resumes), `slurm-<job id>.<step id>` for the
      job's later steps.
    - one process: the current time, `%Y-%m-%d/%H-%M-%S`.

    Raises:
        ValueError: torchrun on several nodes without `--rdzv-id`, or torchrun without Linux's
            /proc: the ranks cannot agree on a folder; `hydra.run.dir=...` sets it explicitly.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
            run_id = os.environ["TORCHELASTIC_RUN_ID"]
            if run_id == "none":
                raise ValueError(
                    "torchrun on several nodes without --rdzv-id: the nodes cannot agree on a run folder; "
                    "pass the same --rdzv-id=<job id> to every node or set hydra.run.dir=..."
                )
            return f"torchrun-{run_id}"
        try:
            started = _process_start_time(os.getppid())
        except OSError as e:
            raise ValueError(
                f"cannot read the torchrun process's start time ({e}) to name the run folder: set hydra.run.dir=..."
            ) from e
        return time.strftime(STAMP_FORMAT, time.localtime(started))
    if "SLURM_JOB_ID" in os.environ and env_dist_info().is_distributed:
        step = os.environ.get("SLURM_STEP_ID", "0")
        return f"slurm-{os.environ['SLURM_JOB_ID']}" + ("" if step == "0" else f".{step}")
    return time.strftime(STAMP_FORMAT)


def if_rank_zero(value: Any, other: Any) -> Any:
    """`value` in the job's rank-0 process (or a single process), `other` in every other rank."""
    return value if env_dist_info().is_main else other


def register_resolvers() -> None:
    """Register `${launch_stamp:}` (cached: one value per config) and `${if_rank_zero:A,B}`."""
    OmegaConf.register_new_resolver("launch_stamp", launch_stamp, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("if_rank_zero", if_rank_zero, replace=True)
