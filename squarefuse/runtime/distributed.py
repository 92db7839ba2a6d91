"""Process-group setup from the launcher's environment, and the few collectives we need.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a SLURM task started by
submitit or srun without torchrun has SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID instead, and the
master address comes from the first node of the job. Those are read in `launch_env`; everything
else in the code asks its `DistInfo`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from squarefuse.runtime.launch_env import DistInfo, env_dist_info, slurm_master_addr


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """`auto` -> this rank's GPU if there is one, else CPU. Explicit names are checked."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name} but no CUDA device is available")
        if name == "cuda":
            return torch.device("cuda", info.local_rank)
    return torch.device(name)


def init_distributed(device_name: str = "auto", timeout_s: float = 1800) -> tuple[DistInfo, torch.device]:
    """Join the process group described by the environment (no-op for a single process)."""
    info = env_dist_info()
    device = resolve_device(device_name, info)
    if info.is_distributed and not dist.is_initialized():
        # One group for both: collectives on CPU tensors (objects, flags) use gloo, CUDA ones NCCL.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" not in os.environ:  # SLURM / submitit tasks: no launcher set these
            os.environ["MASTER_ADDR"] = slurm_master_addr()
            job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "0"
            os.environ.setdefault(
                "MASTER_PORT", str(20000 + int("".join(c for c in job_id if c.isdigit()) or 0) % 20000)
            )
        os.environ.setdefault("MASTER_PORT", "29500")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend=backend,
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return info, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device_name: str) -> Iterator[tuple[DistInfo, torch.device]]:
    """`init_distributed` for the span of an app; the process group is shut down at the end unless
    the caller had already set one up (a test or a script that runs several apps in one process)."""
    was_initialised = dist.is_initialized()
    dist_info, device = init_distributed(device_name)
    try:
        yield dist_info, device
    finally:
        if not was_initialised:
            shutdown()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
