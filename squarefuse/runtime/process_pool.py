"""The process pool the data scripts (check, re-encode, resize) spread videos over, and how helper
processes end with the process that started them."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCH_INTERVAL_S = 0.5


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_WATCH_INTERVAL_S)
    os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """End this process when its parent `parent_pid` ends, even by SIGKILL.

    A parent killed outright runs no clean-up, so the child must see to it: on Linux the kernel
    sends it SIGKILL (``PR_SET_PDEATHSIG``); elsewhere a daemon thread polls the parent's pid. Call
    it first thing in the child. A parent that already died (before the signal was armed) ends the
    child at once. Linux sends the signal when the *thread* that started the child ends: start
    children from a thread that outlives them (the main thread, or one that waits for them).
    """
    try:
        armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    except (OSError, AttributeError):  # not Linux
        armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def video_process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `max(1, workers)` processes, forked where the platform can; they die with the caller.

    Fork: the workers inherit the imported package at no cost, and a script need not be importable
    by name (it runs as __main__ or is loaded from its path by the tests). Each worker starts its
    own decoding child (video_reader.py drops the parent's after a fork). A script killed with
    SIGKILL would otherwise leave its workers blocked on the task queue for good.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return ProcessPoolExecutor(
        max_workers=max(1, workers), mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),)
    )
