"""DataLoader settings shared by training and evaluation."""

from __future__ import annotations

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
