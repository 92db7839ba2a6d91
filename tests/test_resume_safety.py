"""Resuming safely: the run's own newer last.pt wins over trainer.resume, metrics.jsonl holds every
step once after a hard kill, and a changed model/data config is refused with the changed keys."""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path

import pytest
from helpers.configs import tiny_train_config

from squarefuse.engine.config_diff import config_changes, is_harmless
from squarefuse.engine.logging import truncate_metrics
from squarefuse.engine.trainer import Trainer


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def one_epoch_run(data_root, tmp_path_factory) -> Path:
    """A finished 1-epoch run (4 steps); copy it before changing it."""
    run = tmp_path_factory.mktemp("runs") / "one_epoch"
    Trainer(tiny_train_config(data_root, "trainer.epochs=1"), run).fit()
    return run


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def build(cfg, run: Path) -> Trainer:
    """A Trainer that is closed (lock released, workers stopped) once inspected."""
    trainer = Trainer(cfg, run)
    trainer.close()
    return trainer


# ----------------------------------------------------------------------- which file is resumed


def test_own_newer_last_pt_wins_over_trainer_resume(data_root, one_epoch_run, tmp_path, caplog):
    given = tmp_path / "given.pt"
    shutil.copy(one_epoch_run / "checkpoints" / "last.pt", given)  # step 4
    run = tmp_path / "run"
    cfg = tiny_train_config(data_root, f"trainer.resume={given}", "trainer.epochs=2")
    summary = Trainer(cfg, run).fit()  # first start: from the given file, on to step 8
    assert summary["step"] == 8

    caplog.set_level(logging.INFO, logger="squarefuse")
    trainer = build(tiny_train_config(data_root, f"trainer.resume={given}", "trainer.epochs=3"), run)  # a rerun
    assert trainer.step == 8  # not back to step 4
    assert any(
        "resumed from" in r.getMessage()
        and str(run / "checkpoints" / "last.pt") in r.getMessage()
        and "at least as far" in r.getMessage()
        for r in caplog.records
    ), caplog.text


def test_further_trainer_resume_wins_over_own_older_last_pt(data_root, one_epoch_run, tmp_path, caplog):
    further = tmp_path / "further"
    Trainer(tiny_train_config(data_root, "trainer.epochs=2"), copy_run(one_epoch_run, further)).fit()  # step 8
    run = copy_run(one_epoch_run, tmp_path / "run")  # its own last.pt: step 4
    caplog.set_level(logging.INFO, logger="squarefuse")
    given = further / "checkpoints" / "last.pt"
    trainer = build(tiny_train_config(data_root, f"trainer.resume={given}", "trainer.epochs=3"), run)
    assert trainer.step == 8
    assert "is further than the run folder's own last.pt (step 4)" in caplog.text


# --------------------------------------------------------------------------- metrics.jsonl


def test_truncate_metrics_keeps_what_the_checkpoint_covers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"step": 1, "split": "train"},
        {"step": 2, "split": "train"},
        {"step": 2, "split": "val_clip"},
        {"step": 3, "split": "train"},
        {"step": 3, "split": "val_clip"},  # validation after the checkpoint at step 3 was saved
        {"step": 4, "split": "train"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "spl')  # cut by the kill
    assert truncate_metrics(path, step=3, val_step=2) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:4]
    assert truncate_metrics(path, step=3, val_step=2) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


def test_every_step_logged_once_after_a_hard_kill(data_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_train_config(data_root, "trainer.epochs=3")
    original_step = Trainer.train_step

    def stop_after_5(self, batches):
        out = original_step(self, batches)
        if self.step == 5:
            self._stop_signal = signal.SIGTERM
        return out

    monkeypatch.setattr(Trainer, "train_step", stop_after_5)
    assert Trainer(cfg, run).fit()["step"] == 5
    monkeypatch.setattr(Trainer, "train_step", original_step)
    # What a SIGKILL after step 5's checkpoint leaves: later records, the last one cut short.
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "epoch": 1, "split": "train", "loss": 1.0}) + "\n")
        f.write(json.dumps({"step": 8, "epoch": 2, "split": "val_clip", "top1": 50.0}) + "\n")
        f.write('{"step": 7, "epoch": 1, "spl')

    assert Trainer(cfg, run).fit()["status"] == "finished"
    records = read_metrics(run)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in records if r["split"] == "val_clip"] == [4, 8, 12]
    assert 1.0 not in [r["loss"] for r in records if r["split"] == "train"]


# ----------------------------------------------------------------------------- config drift


def test_config_diff_classifies_keys():
    old = {"fusion": {"K": 4, "quantiles": [0.1, 0.5, 0.9]}, "trainer": {"num_workers": 2}, "logger": {"name": "none"}}
    new = {"fusion": {"K": 4, "quantiles": [0.2, 0.5, 0.8]}, "trainer": {"num_workers": 8}, "logger": {"name": "wandb"}}
    changes = {c.key: c for c in config_changes(old, new)}
    assert sorted(changes) == ["fusion.quantiles", "logger.name", "trainer.num_workers"]
    assert not is_harmless(changes["fusion.quantiles"])
    assert is_harmless(changes["trainer.num_workers"]) and is_harmless(changes["logger.name"])
    assert is_harmless(config_changes({"dataset": {"root": "/a", "video_dir": "/a/v"}}, {"dataset": {}})[0])


def test_changed_model_config_on_resume_is_refused_with_the_keys(data_root, one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "run")
    before = (run / "config.yaml").read_text()
    cfg = tiny_train_config(data_root, "fusion.quantiles=[0.2,0.5,0.8]", "dataset.num_frames=6")
    with pytest.raises(ValueError) as err:
        Trainer(cfg, run)
    message = str(err.value)
    assert "fusion.quantiles: [0.1, 0.5, 0.9] (checkpoint) -> [0.2, 0.5, 0.8] (now)" in message
    assert "dataset.num_frames: 4 (checkpoint) -> 6 (now)" in message
    assert "trainer.allow_config_change=true" in message
    assert (run / "config.yaml").read_text() == before  # nothing overwritten
    assert not (run / "run.lock").exists()  # released by the Trainer that failed


def test_allowed_config_change_resumes_and_keeps_the_old_config(data_root, one_epoch_run, tmp_path, caplog):
    run = copy_run(one_epoch_run, tmp_path / "run")
    before = (run / "config.yaml").read_text()
    caplog.set_level(logging.INFO, logger="squarefuse")
    cfg = tiny_train_config(data_root, "fusion.quantiles=[0.2,0.5,0.8]", "trainer.allow_config_change=true")
    trainer = build(cfg, run)
    assert trainer.step == 4
    assert "fusion.quantiles" in caplog.text and "allow_config_change=true" in caplog.text
    assert (run / "config.until_step_4.yaml").read_text() == before
    assert "0.2" in (run / "config.yaml").read_text()


def test_harmless_config_change_resumes_and_is_logged(data_root, one_epoch_run, tmp_path, caplog):
    run = copy_run(one_epoch_run, tmp_path / "run")
    caplog.set_level(logging.INFO, logger="squarefuse")
    trainer = build(tiny_train_config(data_root, "trainer.log_every=3", "trainer.num_workers=1"), run)
    assert trainer.step == 4
    assert "trainer.log_every: 1 (checkpoint) -> 3 (now)" in caplog.text
    assert "trainer.num_workers: 0 (checkpoint) -> 1 (now)" in caplog.text


def test_resume_with_another_fusion_K_names_the_tensors(data_root, one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "run")
    with pytest.raises(ValueError, match=r"fusion.K: 4 \(checkpoint\) -> 8 \(now\)"):
        Trainer(tiny_train_config(data_root, "fusion.K=8"), run)
    # Even when the change is allowed, the shapes cannot fit: the error names tensors and the key.
    with pytest.raises(ValueError) as err:
        Trainer(tiny_train_config(data_root, "fusion.K=8", "trainer.allow_config_change=true"), run)
    message = str(err.value)
    assert "does not fit the model of this config" in message and "fusion.K: 4 (checkpoint) -> 8 (now)" in message
    assert "[4, 48] in the checkpoint, [8, 48] here" in message
    assert "new run folder" in message
