"""The process pool the data scripts (check, re-encode, resize) spread videos over."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def video_process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `max(1, workers)` processes, forked where the platform can.

    Fork: the workers inherit the imported package at no cost, and a script need not be importable
    by name (it runs as __main__ or is loaded from its path by the tests). Each worker starts its
    own decoding child (video_reader.py drops the parent's after a fork).
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return ProcessPoolExecutor(max_workers=max(1, workers), mp_context=context)
