"""Composing app configs from inside the library, and override values Hydra reads back as given."""

from __future__ import annotations

import shlex

import pytest

from squarefuse.config.compose_config import compose_app_config, override, shell_override

PATHS = [
    "runs/2026-12-02/10-00-00/checkpoints/best.pt",
    "multirun/x/0_fusion=none,optim.lr=0.01/checkpoints/best.pt",  # a sweep's run folder
    "/data/it's here/best.pt",
    "C:\\runs\\a=b\\best.pt",
    "ends with a backslash\\",
    "quote after backslash \\'.pt",
    'costs $HOME `and` "more"=1',
]


@pytest.mark.parametrize("path", PATHS)
def test_an_override_reads_back_as_the_value_in_hydra_and_through_the_shell(path):
    assert compose_app_config("eval", [override("ckpt", path)]).ckpt == path
    assert compose_app_config("eval", shlex.split(shell_override("ckpt", path))).ckpt == path


def test_plain_values_stay_as_they_are_and_the_others_are_quoted():
    assert override("ckpt", PATHS[0]) == f"ckpt={PATHS[0]}"
    assert shell_override("ckpt", PATHS[0]) == f"ckpt={PATHS[0]}"
    assert override("ckpt", PATHS[1]) == f"ckpt='{PATHS[1]}'"
    assert shell_override("ckpt", PATHS[1]) == f"\"ckpt='{PATHS[1]}'\""


def test_a_bad_override_names_the_config_and_the_override():
    with pytest.raises(ValueError, match=r"train config with overrides \['fusion=nope'\].*fusion/nope"):
        compose_app_config("train", ["fusion=nope"])
    with pytest.raises(ValueError, match=r"Could not override 'dataset.nokey'"):
        compose_app_config("train", ["dataset.nokey=1"])
