"""DataLoader settings shared by training and evaluation."""

from __future__ import annotations

import os
import random
import traceback

import numpy as np
import pytest
import torch

from squarefuse.runtime.workers import default_num_workers, resolve_cpu_threads, resolve_num_workers
from squarefuse.training.sample_order import SeededDataset


def test_num_workers_auto_is_a_share_of_the_cores(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = default_num_workers()
    assert 1 <= alone <= 8 and resolve_num_workers("auto", key="num_workers") == alone
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1000")  # many ranks on the node: still one worker each
    assert resolve_num_workers("auto", key="num_workers") == 1


def test_num_workers_ints_pass_and_bad_values_name_the_key():
    assert resolve_num_workers(0, key="num_workers") == 0
    assert resolve_num_workers(3, key="trainer.num_workers") == 3
    for bad in (-1, "four", 2.5, True):
        with pytest.raises(ValueError, match="trainer.num_workers must be auto or an int >= 0"):
            resolve_num_workers(bad, key="trainer.num_workers")


def test_cpu_threads_auto_leaves_the_workers_their_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert resolve_cpu_threads("auto", num_workers=2, key="trainer.cpu_threads") == 4
    assert resolve_cpu_threads("auto", num_workers=0, key="trainer.cpu_threads") == 6
    assert resolve_cpu_threads("auto", num_workers=8, key="trainer.cpu_threads") == 1  # never 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks: 3 cores each
    assert resolve_cpu_threads("auto", num_workers=1, key="trainer.cpu_threads") == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins: torch keeps its own choice
    assert resolve_cpu_threads("auto", num_workers=1, key="trainer.cpu_threads") is None
    assert resolve_cpu_threads(5, num_workers=1, key="trainer.cpu_threads") == 5
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ValueError, match="trainer.cpu_threads must be auto or an int >= 1"):
            resolve_cpu_threads(bad, num_workers=1, key="trainer.cpu_threads")


def test_seeding_a_sample_sets_the_rngs_as_torch_manual_seed_does_without_formatting_the_stack(monkeypatch):
    # torch.manual_seed queues a seeding of each uninitialised accelerator with a formatted copy of the
    # call stack: per sample, it cost the trainer on a token cache a fifth of its speed (issue 29 item 7).
    formatted = []
    real_format_stack = traceback.format_stack
    monkeypatch.setattr(traceback, "format_stack", lambda *a, **k: formatted.append(1) or real_format_stack(*a, **k))
    seeded = SeededDataset(Draws())
    for seed in (5, 2**62 + 7):
        sample = seeded[(3, seed)]
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.default_generator.manual_seed(seed)
        assert sample == (3, random.random(), np.random.random(), torch.rand(()).item())
    assert formatted == []


class Draws:
    """A dataset whose item is what each RNG draws first after SeededDataset seeded them."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, float, float, float]:
        return index, random.random(), np.random.random(), torch.rand(()).item()
