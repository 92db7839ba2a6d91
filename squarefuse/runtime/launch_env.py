"""Where this process sits in its job, read from the launcher's environment: no torch imported.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a SLURM task started by submitit or srun without
torchrun has SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID instead. Apart from `distributed` (the
process group, which imports torch) so that what only asks "am I rank 0?" (the Hydra resolvers
that name the run folder, the one-line user errors) does not pay ~2 s of torch import for it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def slurm_master_addr() -> str:
    """The first node of the SLURM job (its process group's master), or this host outside SLURM."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # No scontrol (e.g. submitit's local executor): a single node, so the nodelist is the host.
        return nodelist.split(",")[0].split("[")[0]


def env_dist_info() -> DistInfo:
    """Read rank/world size from torchrun's variables, else submitit's or SLURM's, else one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if "SUBMITIT_EXECUTOR" in os.environ:  # a task started by submitit (SLURM or its local executor)
        import submitit  # noqa: PLC0415 - only under submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            return DistInfo(env.global_rank, env.num_tasks, env.local_rank)
        return DistInfo()
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(
            int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
        )
    return DistInfo()
