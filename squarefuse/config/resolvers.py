"""Config resolvers that read the launcher's environment, so that every rank composes the same run.

Each rank of a torchrun or SLURM job composes its own config. `${launch_dir:PARENT}` names the run
folder alike on every rank from what the launcher gives all of them (no process group is needed
before Hydra starts) and apart from every other job's, also one started in the same second
(`launch_dir`); `${if_rank_zero:A,B}` lets configs keep the other ranks from writing Hydra's files
(configs/hydra/job_logging/rank_zero.yaml, `hydra.output_subdir`).

Call `register_resolvers()` before `@hydra.main` composes the config (train.py, eval.py).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from squarefuse.runtime.launch_env import env_dist_info

STAMP_FORMAT = "%Y-%m-%d/%H-%M-%S"
# Inside a folder made by `launch_dir`: who made it (the launch's owner id), so that every rank of
# that launch, and no other job, recognises the folder as its own.
OWNER_FILE = ".launch"
_MAX_CLAIMS = 1000
# Characters of a sweep folder's name: ones Hydra's override grammar and the shell read as they are,
# so that `ckpt=<sweep>/<job>/checkpoints/best.pt` works unquoted (no '=', ',', quotes, brackets, spaces).
_SWEEP_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def _process_start_ticks(pid: int) -> int:
    """Clock ticks after boot at which process `pid` started, from Linux's /proc."""
    with open(f"/proc/{pid}/stat") as f:
        # Field 22 (starttime); the command name (field 2) may hold spaces.
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _process_start_time(pid: int) -> float:
    """Unix time at which process `pid` started, from Linux's /proc."""
    with open("/proc/stat") as f:
        boot_time = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot_time + _process_start_ticks(pid) / os.sysconf("SC_CLK_TCK")


def _torchrun_agent_id() -> str:
    """The torchrun process (the parent of every rank on this node), as an id no other process has.

    The pid alone repeats across machines that share a file system and across containers (each
    counts from 1); the boot id tells machines apart, the pid namespace containers, and the start
    time a pid that was reused.
    """
    ppid = os.getppid()
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    return f"torchrun {boot_id} {os.readlink('/proc/self/ns/pid')} {ppid} {_process_start_ticks(ppid)}"


def _launch() -> tuple[str, str | None]:
    """This launch's run-folder name (`launch_stamp`) and the id of its owner: the same string in
    every rank of one launch, a different one in any other job; None where the name itself is
    unique to the launch (a torchrun rendezvous id, a SLURM job id), so no claim is needed."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
            run_id = os.environ["TORCHELASTIC_RUN_ID"]
            if run_id == "none":
                raise ValueError(
                    "torchrun on several nodes without --rdzv-id: the nodes cannot agree on a run folder; "
                    "pass the same --rdzv-id=<job id> to every node or set hydra.run.dir=..."
                )
            return f"torchrun-{run_id}", None
        try:
            started = _process_start_time(os.getppid())
            owner = _torchrun_agent_id()
        except OSError as e:
            raise ValueError(
                f"cannot read the torchrun process's start time ({e}) to name the run folder: set hydra.run.dir=..."
            ) from e
        return time.strftime(STAMP_FORMAT, time.localtime(started)), owner
    if "SLURM_JOB_ID" in os.environ and env_dist_info().is_distributed:
        step = os.environ.get("SLURM_STEP_ID", "0")
        return f"slurm-{os.environ['SLURM_JOB_ID']}" + ("" if step == "0" else f".{step}"), None
    # One process: an id of its own for each folder it asks for.
    return time.strftime(STAMP_FORMAT), f"process {uuid.uuid4().hex}"


def launch_stamp() -> str:
    """This job's run-folder name, computed alike on every rank without communicating.

    - torchrun on one node: the start time of the torchrun process (the parent of every rank), as
      `%Y-%m-%d/%H-%M-%S`; ranks it restarts (`--max-restarts`) get the same folder and resume.
    - torchrun on several nodes: `torchrun-<rdzv id>`, the one value all nodes share.
    - several SLURM tasks started without torchrun (`srun python train.py`): `slurm-<job id>` (as in
      scripts/slurm/train.sbatch, so a requeued job resumes), `slurm-<job id>.<step id>` for the
      job's later steps.
    - one process: the current time, `%Y-%m-%d/%H-%M-%S`.

    A time is not unique (jobs started in the same second share it): `launch_dir` makes the folder.

    Raises:
        ValueError: torchrun on several nodes without `--rdzv-id`, or torchrun without Linux's
            /proc: the ranks cannot agree on a folder; `hydra.run.dir=...` sets it explicitly.
    """
    return _launch()[0]


def _claim(path: Path, owner: str) -> bool:
    """Make the folder `path` owned by `owner`, or find it already is; False: another job's."""
    # The folder appears together with its owner file (a rename), so no rank ever sees one without
    # the other; a rename onto a folder that exists (holding at least the owner file) fails. (Linux
    # lets it replace an empty folder: no one's files are lost.)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    (tmp / OWNER_FILE).write_text(owner + "\n")
    try:
        tmp.rename(path)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        return (path / OWNER_FILE).read_text().strip() == owner
    except OSError:  # a folder of an older version or of another tool, or a file: not ours
        return False


def launch_dir(parent: str, sep: str = "/", suffix: str = "") -> str:
    """`parent/<launch stamp><suffix>` (`sep` between date and time), a folder this launch alone owns.

    Every rank of a torchrun job lands in the same folder, any other job in another one: a job
    started in the same second as another gets `<time>_2` (then `_3`...), made create-exclusively
    (`_claim`), also between machines that share the file system. Folders named by a torchrun
    rendezvous id or a SLURM job id are unique to their job already and not claimed, so a
    requeued job finds its folder and resumes.

    Raises:
        ValueError: see `launch_stamp`.
    """
    stamp, owner = _launch()
    base = Path(parent) / (stamp.replace("/", sep) + suffix)
    if owner is None:
        return str(base)
    for n in range(1, _MAX_CLAIMS + 1):
        path = base if n == 1 else base.with_name(f"{base.name}_{n}")
        if _claim(path, owner):
            return str(path)
    raise ValueError(f"{_MAX_CLAIMS} folders named {base}[_N] exist already: set hydra.run.dir=...")


def _swept_keys(sweep_dir: Path) -> set[str] | None:
    """The keys a multirun sweeps over (`fusion`, `trainer.seed`...), from the `multirun.yaml` Hydra
    writes into the sweep folder before it launches the jobs; None when it cannot be read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415 - Hydra's own
    from hydra.errors import HydraException  # noqa: PLC0415

    try:
        saved = OmegaConf.load(sweep_dir / "multirun.yaml")
        overrides = OverridesParser.create().parse_overrides(list(saved.hydra.overrides.task))
    except (OSError, HydraException, AttributeError):
        return None
    return {o.key_or_group for o in overrides if o.is_sweep_override()}


def _short_keys(keys: list[str]) -> list[str]:
    """Each key's last part (`trainer.seed` -> `seed`, `hydra/launcher` -> `launcher`), or the whole key
    where two keys share their last part (`optim.lr` and `head.lr`)."""
    last = [re.split(r"[./]", key)[-1] for key in keys]
    return [short if last.count(short) == 1 else key.replace("/", ".") for key, short in zip(keys, last, strict=True)]


def sweep_subdir(job_num: Any, task_overrides: Any, sweep_dir: str, max_chars: int = 60) -> str:
    """A multirun job's folder: `<job number>_<key>-<value>_...`, e.g. `3_fusion-none_seed-0`.

    Only the overrides of the keys the sweep varies (read from its `multirun.yaml`; all of the
    job's overrides when that is missing), in the order given, each key by its last part unless two
    share it. Anything but letters, digits and `._+-` becomes `-`, so the path can be passed to our
    apps unquoted (`ckpt=<job folder>/checkpoints/best.pt`) and a path value never nests folders; the
    name is cut to `max_chars`, and the job number keeps the folders unique and sorted. What a job
    ran is in its `.hydra/overrides.yaml` (what `scripts/report.py` groups by), not in this name.
    """
    swept = _swept_keys(Path(sweep_dir))
    pairs = [str(o).lstrip("+~").split("=", 1) for o in task_overrides]
    chosen = [(kv[0], kv[1] if len(kv) > 1 else "") for kv in pairs if swept is None or kv[0] in swept]
    keys = _short_keys([key for key, _ in chosen])
    values = [_SWEEP_UNSAFE.sub("-", value).strip("-") for _, value in chosen]
    words = [f"{key}-{value}" if value else key for key, value in zip(keys, values, strict=True)]
    safe = _SWEEP_UNSAFE.sub("-", "_".join(words))[:max_chars].rstrip("-_")
    return f"{job_num}_{safe}" if safe else str(job_num)


def if_rank_zero(value: Any, other: Any) -> Any:
    """`value` in the job's rank-0 process (or a single process), `other` in every other rank."""
    return value if env_dist_info().is_main else other


def register_resolvers() -> None:
    """Register `${launch_dir:PARENT}` (cached: one folder per config), `${if_rank_zero:A,B}` and
    `${sweep_subdir:NUM,OVERRIDES,SWEEP_DIR}`."""
    OmegaConf.register_new_resolver("launch_dir", launch_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir, replace=True)
    OmegaConf.register_new_resolver("if_rank_zero", if_rank_zero, replace=True)
