"""DataLoader settings shared by training and evaluation."""

from __future__ import annotations

import pytest

from squarefuse.engine.loader import default_num_workers, resolve_num_workers


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
