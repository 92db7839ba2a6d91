"""Resuming safely: the run's own newer last.pt wins over trainer.resume, metrics.jsonl holds every
step once after a hard kill, a changed model/data config is refused with the changed keys, a new run
length gets its own lr schedule, a damaged checkpoint is named and never resumed, and saves on a bad
disk (full, read-only, killed mid-write) say what happened."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import flip_bit, unwritable
from helpers.configs import tiny_train_config

from squarefuse.checkpoint import load_checkpoint, save_checkpoint
from squarefuse.training import trainer as trainer_module
from squarefuse.training.metrics_log import truncate_metrics
from squarefuse.training.resume_checks import config_changes, is_harmless
from squarefuse.training.trainer import Trainer


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


@pytest.mark.slow
def test_own_newer_last_pt_wins_over_trainer_resume(data_root, one_epoch_run, tmp_path, caplog):
    given = tmp_path / "given.pt"
    shutil.copy(one_epoch_run / "checkpoints" / "last.pt", given)  # step 4
    run = tmp_path / "run"
    cfg = tiny_train_config(data_root, f"trainer.resume={given}", "trainer.epochs=2")
    summary = Trainer(cfg, run).fit()  # first start: from the given file, on to step 8
    assert summary["step"] == 8

    caplog.set_level(logging.INFO, logger="squarefuse")
    trainer = build(tiny_train_config(data_root, f"trainer.resume={given}", "trainer.epochs=3"), run)  # a rerun
    assert trainer.state.step == 8  # not back to step 4
    assert any(
        "resumed from" in r.getMessage()
        and str(run / "checkpoints" / "last.pt") in r.getMessage()
        and "at least as far" in r.getMessage()
        for r in caplog.records
    ), caplog.text


@pytest.mark.slow
def test_further_trainer_resume_wins_over_own_older_last_pt(data_root, one_epoch_run, tmp_path, caplog):
    further = tmp_path / "further"
    Trainer(tiny_train_config(data_root, "trainer.epochs=2"), copy_run(one_epoch_run, further)).fit()  # step 8
    run = copy_run(one_epoch_run, tmp_path / "run")  # its own last.pt: step 4
    caplog.set_level(logging.INFO, logger="squarefuse")
    given = further / "checkpoints" / "last.pt"
    trainer = build(tiny_train_config(data_root, f"trainer.resume={given}", "trainer.epochs=3"), run)
    assert trainer.state.step == 8
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


@pytest.mark.slow
def test_every_step_logged_once_after_a_hard_kill(data_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_train_config(data_root, "trainer.epochs=3")
    original_step = Trainer.train_step

    def stop_after_5(self, batches):
        out = original_step(self, batches)
        if self.state.step == 5:
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


def test_resume_checks_classify_keys():
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
    assert trainer.state.step == 4
    assert "fusion.quantiles" in caplog.text and "allow_config_change=true" in caplog.text
    assert (run / "config.until_step_4.yaml").read_text() == before
    assert "0.2" in (run / "config.yaml").read_text()


def test_harmless_config_change_resumes_and_is_logged(data_root, one_epoch_run, tmp_path, caplog):
    run = copy_run(one_epoch_run, tmp_path / "run")
    caplog.set_level(logging.INFO, logger="squarefuse")
    trainer = build(tiny_train_config(data_root, "trainer.log_every=3", "trainer.num_workers=1"), run)
    assert trainer.state.step == 4
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


# ------------------------------------------------------------------------------ lr schedule


def _lr_after(trainer: Trainer, step: int) -> float:
    """The lr the train records show after `step` (the largest of the param groups)."""
    trainer.scheduler.step_update(num_updates=step)
    return max(group["lr"] for group in trainer.optimizer.param_groups)


@pytest.mark.slow
def test_resume_with_a_longer_run_rebuilds_the_lr_schedule(data_root, one_epoch_run, tmp_path, caplog):
    run = copy_run(one_epoch_run, tmp_path / "run")  # 4 steps: its schedule ended at min_lr
    cfg = tiny_train_config(data_root, "trainer.max_steps=12", "trainer.epochs=3")
    reference = build(cfg, tmp_path / "fresh")  # the schedule of a 12-step run, from the config alone
    expected = {step: _lr_after(reference, step) for step in range(5, 13)}
    caplog.set_level(logging.INFO, logger="squarefuse")
    assert Trainer(cfg, run).fit()["step"] == 12
    lrs = {r["step"]: r["lr"] for r in read_metrics(run) if r["split"] == "train" and r["step"] > 4}
    assert lrs == pytest.approx(expected)
    assert lrs[5] > 100 * float(cfg.schedule.min_lr)  # not the old schedule's end
    assert "lr schedule of 4 steps" in caplog.text and "the schedule is rebuilt" in caplog.text


def test_resume_with_another_world_size_is_refused_naming_both(data_root, one_epoch_run, tmp_path):
    # What 2 ranks save in the middle of their second epoch (2 steps an epoch at twice the batch):
    # resumed by 1 process it used to skip to the next epoch and rebuild the schedule, training
    # past trainer.epochs (issue 28, item 7).
    run = copy_run(one_epoch_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state.update(world_size=2, rng=state["rng"] * 2, step=3, epoch=1, batch_in_epoch=1)
    save_checkpoint(state, last)
    cfg = tiny_train_config(data_root, "trainer.epochs=3")
    with pytest.raises(ValueError) as error:
        Trainer(cfg, run)
    message = str(error.value)
    micro, accum = int(cfg.trainer.batch_size), int(cfg.trainer.accum_steps)
    assert f"{last} was saved by a run of world size 2 (global batch {micro} x {accum} x 2 = " in message, message
    assert "at step 3: epoch 1, micro-batch 1 of it" in message
    assert f"this run has world size 1 (global batch {micro * accum})" in message
    assert "Resume with world size 2" in message and f"trainer.init_from={last}" in message
    assert load_checkpoint(last)["step"] == 3  # nothing was trained or saved


def test_resume_with_another_schedule_kind_is_refused_naming_the_key(data_root, one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "run")
    with pytest.raises(ValueError, match=r"schedule\.name: 'cosine' \(checkpoint\) -> 'step' \(now\)"):
        Trainer(tiny_train_config(data_root, "schedule=step", "trainer.epochs=3"), run)
    # Allowed config changes or not, a step schedule cannot continue a cosine one's state.
    cfg = tiny_train_config(data_root, "schedule=step", "trainer.epochs=3", "trainer.allow_config_change=true")
    with pytest.raises(ValueError) as err:
        Trainer(cfg, run)
    message = str(err.value)
    assert "trained with schedule.name=cosine, and this run has schedule.name=step" in message
    assert "Resume with schedule=cosine" in message and "new run folder" in message
    assert not (run / "run.lock").exists()


def test_resume_restores_the_saved_schedule_through_its_state_dict(data_root, one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    saved = load_checkpoint(last)["scheduler"]
    assert saved["spec"]["kind"] == "cosine" and saved["spec"]["total_steps"] == 4
    state = load_checkpoint(last)
    state["scheduler"]["state"]["noise_seed"] = 7  # a field only the saved state has: loaded, not rebuilt
    save_checkpoint(state, last)
    trainer = build(tiny_train_config(data_root, "trainer.epochs=1"), run)
    assert trainer.scheduler.state_dict()["noise_seed"] == 7


def test_a_checkpoint_saved_before_schedule_specs_resumes_on_the_same_lrs(data_root, one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["scheduler"] = state["scheduler"]["state"]  # what older versions saved: timm's state only
    save_checkpoint(state, last)
    cfg = tiny_train_config(data_root, "trainer.epochs=1")
    old = build(cfg, run)
    fresh = build(cfg, tmp_path / "fresh")
    assert [_lr_after(old, s) for s in range(5)] == [_lr_after(fresh, s) for s in range(5)]


# ------------------------------------------------------------------------- damaged checkpoints


def test_bit_flipped_last_pt_is_named_and_the_run_falls_back_to_best_pt(data_root, one_epoch_run, tmp_path, caplog):
    run = copy_run(one_epoch_run, tmp_path / "run")
    last, best = run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt"
    member = flip_bit(last)
    caplog.set_level(logging.INFO, logger="squarefuse")
    trainer = build(tiny_train_config(data_root), run)
    assert trainer.state.step == load_checkpoint(best)["step"] == 4
    assert f"checkpoint {last} is damaged: member {member!r}" in caplog.text
    assert f"resumed from {best}" in caplog.text and "newest intact checkpoint" in caplog.text


def test_damaged_last_pt_without_another_checkpoint_is_refused_naming_it(data_root, one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    member = flip_bit(last)
    (run / "checkpoints" / "best.pt").unlink()
    with pytest.raises(ValueError) as error:
        Trainer(tiny_train_config(data_root), run)
    message = str(error.value)
    assert f"checkpoint {last} is damaged: member {member!r}" in message
    assert "trainer.resume=PATH" in message
    assert not (run / "run.lock").exists()


def test_explicit_resume_works_when_the_runs_own_last_pt_is_truncated(data_root, one_epoch_run, tmp_path, caplog):
    run = copy_run(one_epoch_run, tmp_path / "run")
    last, best = run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    caplog.set_level(logging.INFO, logger="squarefuse")
    # What the error message suggests: the run's best.pt.
    assert build(tiny_train_config(data_root, f"trainer.resume={best}"), run).state.step == 4
    assert f"checkpoint {last} is truncated" in caplog.text
    # A file from elsewhere, when the run has no other intact checkpoint.
    elsewhere = tmp_path / "copy.pt"
    shutil.move(best, elsewhere)
    trainer = build(tiny_train_config(data_root, f"trainer.resume={elsewhere}"), run)
    assert trainer.state.step == 4
    assert "the run folder has no intact checkpoint" in caplog.text


# ------------------------------------------------------------------- temp files, full disk


def test_temporary_files_of_killed_saves_are_removed_at_start_up(data_root, one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "run")
    checkpoints = run / "checkpoints"
    for folder, name in [(checkpoints, "last.pt")] * 4 + [(checkpoints, "best.pt"), (run, "metrics.jsonl")]:
        fd, _ = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)  # what a SIGKILL mid-save leaves
        os.close(fd)
    (checkpoints / "notes.tmp").write_text("not ours")
    build(tiny_train_config(data_root), run)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt", "notes.tmp"]
    assert not list(run.glob(".*.tmp"))


def test_full_disk_at_a_save_names_the_file_and_what_is_intact(data_root, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def full_disk_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 part of a checkpoint")
        try:  # as torch raises it: "unexpected pos" while handling the OSError of the write
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    def full_disk_at_best(state, path):
        with monkeypatch.context() as patch:
            if Path(path).name == "best.pt":
                patch.setattr(torch, "save", full_disk_save)
            return save_checkpoint(state, path)

    monkeypatch.setattr(trainer_module, "save_checkpoint", full_disk_at_best)
    with pytest.raises(OSError, match="no space left on device while writing .*best.pt"):
        Trainer(tiny_train_config(data_root, "trainer.epochs=1"), run).fit()
    end = read_metrics(run)[-1]
    assert end["status"] == "crashed"
    assert f"no space left on device while writing {run / 'checkpoints' / 'best.pt'}" in end["error"]
    assert "was not written" in end["error"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # saved before validation


def test_unwritable_checkpoints_folder_is_found_at_start_up(data_root, one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "run")
    checkpoints = run / "checkpoints"
    with unwritable(checkpoints):
        with pytest.raises(PermissionError, match=f"cannot write to {checkpoints} .*checkpoints"):
            Trainer(tiny_train_config(data_root), run)
    assert not (run / "run.lock").exists()
