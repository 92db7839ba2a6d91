"""The trainer's warning that data loading is the bottleneck names remedies for the data it reads."""

from __future__ import annotations

import pytest

from squarefuse.training.loop import data_bound_warning


def test_a_token_cache_is_not_sent_to_the_video_scripts():
    text = data_bound_warning("tokens", 0.6, 120.0, 2)
    assert text.startswith("data loading is the bottleneck: 60% of step time is spent waiting for data (120.0 clips/s")
    assert "trainer.num_workers" in text and "tokens=cls or pooled" in text
    assert "prepare_k400" not in text and "prepare_ssv2" not in text and "repeated_aug" not in text


@pytest.mark.parametrize("name", ["k400", "ssv2", "list"])
def test_videos_get_the_video_remedies(name):
    text = data_bound_warning(name, 0.45, 8.0, 4)
    assert "with 4 workers per rank" in text and "scripts/prepare_k400.py" in text and "dataset.repeated_aug" in text
