"""A training list edited between the kill and the resume: other data under the same config is refused, by name."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from helpers.checkpoints import make_list_dataset, tiny_train_cfg
from helpers.configs import tiny_trainer_overrides

from squarefuse.training.resume_checks import training_list
from squarefuse.training.trainer import Trainer

LABELS = [0, 1, 2, 0, 1, 2, 0, 1]


def _cfg(root: Path, *extra: str):
    return tiny_train_cfg(root, *tiny_trainer_overrides(batch_size=4), "trainer.epochs=1", *extra)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> tuple[Path, Path]:
    """A list dataset and a 1-epoch run on it (2 steps); copy both before changing them."""
    data = make_list_dataset(tmp_path_factory.mktemp("data") / "videos", LABELS)
    run = tmp_path_factory.mktemp("runs") / "run"
    Trainer(_cfg(data), run).fit()
    return data, run


def _copies(killed_run, tmp_path: Path) -> tuple[Path, Path]:
    data, run = killed_run
    return shutil.copytree(data, tmp_path / "data"), shutil.copytree(run, tmp_path / "run")


def test_the_digest_follows_ids_and_labels_not_the_root():
    class Record:
        def __init__(self, path, label, id):
            self.path, self.label, self.id = path, label, id

    a = training_list([Record("/a/v0.mp4", 0, "v0.mp4"), Record("/a/v1.mp4", 1, "v1.mp4")])
    assert a == training_list([Record("/b/v0.mp4", 0, "v0.mp4"), Record("/b/v1.mp4", 1, "v1.mp4")])
    assert a != training_list([Record("/a/v0.mp4", 0, "v0.mp4"), Record("/a/v1.mp4", 2, "v1.mp4")])
    assert a["videos"] == 2


@pytest.mark.parametrize("edit", ["relabel", "add"])
def test_an_edited_training_list_is_refused_on_resume(killed_run, tmp_path, edit):
    data, run = _copies(killed_run, tmp_path)
    lines = (data / "train.txt").read_text().splitlines()
    if edit == "relabel":  # the same videos, one label changed: before, no message at all
        lines[0] = "v0.mp4 1"
    else:  # two more videos: before, blamed on "the run length, world size, batch or optim settings"
        lines += ["v1.mp4 1", "v2.mp4 2"]
        lines[-2:] = [f"copy_{line}" for line in lines[-2:]]
        for name in ("v1.mp4", "v2.mp4"):
            shutil.copy(data / name, data / f"copy_{name}")
    (data / "train.txt").write_text("\n".join(lines) + "\n")
    videos = len(lines)
    with pytest.raises(ValueError, match="was trained on another training list") as err:
        Trainer(_cfg(data), run)
    message = str(err.value)
    assert f"({len(LABELS)} videos then, {videos} now;" in message and "dataset.train_file" in message
    assert "trainer.allow_config_change=true" in message and not (run / "run.lock").exists()


def test_a_moved_copy_of_the_same_list_resumes(killed_run, tmp_path, caplog):
    data, run = _copies(killed_run, tmp_path)
    caplog.set_level(logging.INFO, logger="squarefuse")
    trainer = Trainer(_cfg(data, "trainer.epochs=2"), run)  # dataset.root moved: the same (id, label) pairs
    trainer.close()
    assert trainer.state.step == 2 and "another training list" not in caplog.text
