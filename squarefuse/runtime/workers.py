"""DataLoader settings shared by training and evaluation, and how their workers end.

Workers ignore the stop signals (below), so nothing but their parent may end them. Three paths
make sure they always do, and promptly:

- the trainer shuts its persistent workers down itself when `fit` ends, normally or not
  (`shutdown_workers`);
- a worker dies with its parent (`PR_SET_PDEATHSIG`, and the DataLoader's own watchdog);
- at interpreter exit, daemonic children still alive (an iterator kept alive by an exception's
  traceback, e.g. one raised in the middle of a validation) are killed: multiprocessing's own exit
  handler would send them SIGTERM, which they ignore, and then join them without a timeout,
  hanging the process forever after the error was printed.

A loader's consumer never waits for them without bound either: `bounded_batches` turns a worker
that died, or a batch that did not come within the DataLoader's `timeout`, into `LoaderStalled`
naming the batch's videos, and kills the workers that are left.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import multiprocessing.util  # noqa: F401 - registers its exit handler before ours (see below)
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils import signal_handling

from squarefuse.runtime.process_pool import die_with_parent

# How long children that were sent SIGTERM at exit get before SIGKILL.
_EXIT_GRACE_S = 1.0
# The DataLoader's own errors for a batch that did not come (`timeout`) and for a worker that died
# (found by its SIGCHLD handler or its liveness check); any other error is the dataset's own.
_LOADER_FAILURE = re.compile(r"DataLoader (timed out after|worker \(pid)")


class LoaderStalled(RuntimeError):
    """A DataLoader worker died, or a batch did not come within the loader's timeout."""


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: leave SIGTERM/SIGINT/SIGUSR2 to the main process; die with it.

    torchrun and SLURM signal the whole process group on shutdown or preemption. A worker that
    died of it would crash the main process's next batch before it could save its checkpoint;
    instead the main process finishes the step, saves, and shuts its workers down itself. If the
    main process is killed outright, the kernel kills the worker too (Linux).
    """
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(os.getppid())


def private_generator(seed: int) -> torch.Generator:
    """A generator for the DataLoader's worker base seeds, so that starting an iterator never
    draws from the global RNG (that would shift MixUp / drop path of a resumed run by one draw)."""
    return torch.Generator().manual_seed(seed)


def _cpu_share() -> int:
    """This rank's share of the CPU cores it may run on (at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def default_num_workers() -> int:
    """Data-loader workers per rank: this rank's share of the CPU cores, 1 to 8."""
    return min(8, _cpu_share())


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


def resolve_cpu_threads(value: int | str, *, num_workers: int, key: str) -> int | None:
    """Torch intra-op threads of a process that computes on the CPU next to `num_workers` workers.

    `auto`: the cores of this rank's share that the workers leave free, at least 1; None (torch's
    own choice) when OMP_NUM_THREADS is set, which then wins. Busy OpenMP threads that the workers
    keep preempting wait on each other: on 2 cores with 2 workers, 1 thread trains the synthetic
    recipe 1.4x faster than 2 (measured: 192 steps in 23.6 s instead of 33.6 s).

    Raises:
        ValueError: naming `key`, unless `value` is `auto` or an int >= 1.
    """
    if value == "auto":
        return None if os.environ.get("OMP_NUM_THREADS") else max(1, _cpu_share() - num_workers)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be auto or an int >= 1, got {value!r}")
    return value


def shutdown_workers(loader: DataLoader) -> None:
    """Stop the worker processes of `loader`'s persistent iterator now (nothing to do without one).

    DataLoader has no public call for this; its iterator's `_shutdown_workers` is what its own
    `__del__` runs, so a later garbage collection finds nothing left to do.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def bounded_batches(loader: DataLoader, *, describe: Callable[[int], str], advice: str) -> Iterator[Any]:
    """The batches of `loader`, or `LoaderStalled` when its workers stop delivering them.

    With workers, give the loader a `timeout` (seconds per batch): PyTorch then raises when a batch
    does not come in time, and at once when a worker dies. Either becomes `LoaderStalled` naming
    batch k as `describe(k)` says (its videos), with PyTorch's message (the worker's pid) and
    `advice` (what to change); the workers are killed first, since a stuck one ignores SIGTERM.

    Args:
        loader: the DataLoader (batches come in sampler order: batch k is the k-th).
        describe: batch number -> what it holds, e.g. "videos 8-11: a.mp4, ...".
        advice: what the user can do, e.g. which keys to change.
    """
    iterator = iter(loader)
    for k in itertools.count():
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as e:
            if not _LOADER_FAILURE.search(str(e)):
                raise
            _kill_workers(iterator)
            raise LoaderStalled(f"data loading stopped at batch {k} ({describe(k)}): {e}. {advice}") from e
        yield batch


def _kill_workers(iterator: Any) -> None:
    # A stuck worker ignores the SIGTERM of the iterator's own shutdown (see ignore_stop_signals)
    # and would live on, stuck, until this process ends: SIGKILL it, then let the iterator clean up.
    # Its pids leave PyTorch's SIGCHLD watch first: else the handler raises "worker ... is killed by
    # signal" at whatever line this process is on when the child dies (seen under load, in place of
    # LoaderStalled); the iterator's own shutdown would unregister them only after its joins.
    if getattr(iterator, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def _kill_leftover_children() -> None:
    children = [p for p in multiprocessing.active_children() if p.daemon]
    for child in children:
        child.terminate()
    deadline = time.monotonic() + _EXIT_GRACE_S
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(timeout=_EXIT_GRACE_S)


# atexit runs handlers last-registered-first: multiprocessing.util registered its exit handler
# (terminate + join every daemonic child) when imported above, so this one runs before it.
atexit.register(_kill_leftover_children)
