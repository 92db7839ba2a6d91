"""DataLoader settings shared by training and evaluation."""

from __future__ import annotations

import os
import signal

import torch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: leave SIGTERM/SIGINT/SIGUSR2 to the main process.

    torchrun and SLURM signal the whole process group on shutdown or preemption. A worker that
    died of it would crash the main process's next batch before it could save its checkpoint;
    instead the main process finishes the step, saves, and shuts its workers down itself.
    """
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def private_generator(seed: int) -> torch.Generator:
    """A generator for the DataLoader's worker base seeds, so that starting an iterator never
    draws from the global RNG (that would shift MixUp / drop path of a resumed run by one draw)."""
    return torch.Generator().manual_seed(seed)


def default_num_workers() -> int:
    """Data-loader workers per rank: this rank's share of the CPU cores, 1 to 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))


def resolve_num_workers(value: int | str, *, key: str) -> int:
    """A `num_workers` config value: `auto` -> `default_num_workers()`; ints >= 0 pass through.

    Raises:
        ValueError: naming `key` (e.g. "trainer.num_workers"), for anything else.
    """
    if value == "auto":
        return default_num_workers()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be auto or an int >= 0, got {value!r}")
    return value
