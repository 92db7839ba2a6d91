"""The training app: config groups, a tiny end-to-end run, checkpoints, exact resume, signals."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.configs import CONFIG_DIR, compose_config, tiny_overrides, tiny_train_config
from helpers.scripts import run_script
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from squarefuse.checkpoint import load_checkpoint, save_checkpoint
from squarefuse.training import loop as loop_mod
from squarefuse.training import trainer as trainer_mod
from squarefuse.training.state import TrainState
from squarefuse.training.trainer import Trainer, check_trainer_cfg

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


# ------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("group", ["dataset", "backbone", "fusion", "head", "optim", "trainer", "logger", "experiment"])
def test_every_option_of_every_group_composes(group):
    options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    assert options, group
    for option in options:
        cfg = compose_config("train", [f"{group}={option}"])
        assert group == "experiment" or cfg[group] is not None  # experiments are global patches
        OmegaConf.resolve(cfg)  # every interpolation resolves


def test_real_datasets_select_the_vit_b16_recipe():
    for name in ("ssv2", "k400"):
        cfg = compose_config("train", [f"dataset={name}", "fusion.K=8"])
        assert cfg.backbone.name.startswith("vit_base_patch16_224")
        assert cfg.dataset.crop_size == 224
        assert cfg.fusion.K == 8
        assert cfg.optim.layer_decay == 0.75 and cfg.optim.weight_decay == 0.05
        assert cfg.trainer.mixup == 0.8 and cfg.trainer.cutmix == 1.0 and cfg.trainer.label_smoothing == 0.1
        # The command line still wins over the recipe.
        cfg = compose_config("train", [f"dataset={name}", "backbone=tiny"])
        assert cfg.dataset.crop_size == cfg.backbone.img_size == 64
    assert compose_config("train", ["dataset=ssv2"]).dataset.hflip is False
    assert compose_config("train", ["dataset=k400"]).dataset.hflip is True


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_config("train", ["trainer.no_such_key=1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.precision=bf17", "trainer.precision"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.nonfinite=ignore", "trainer.nonfinite"),
        ("trainer.label_smoothing=1.5", "trainer.label_smoothing"),
    ],
)
def test_invalid_trainer_values_are_named(override, key):
    cfg = compose_config("train", [override])
    with pytest.raises(ValueError, match=key):
        check_trainer_cfg(cfg.trainer)


# ----------------------------------------------------------------------------------- checkpoints


class NotAllowed:
    pass


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": NotAllowed()}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(path)


def test_interrupted_checkpoint_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, path)

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary files left behind


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_tiny_run_writes_metrics_and_checkpoints(data_root, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="squarefuse"):
        summary = Trainer(tiny_train_config(data_root), run).fit()
    assert summary["status"] == "finished"
    metrics = read_metrics(run)
    train = [r for r in metrics if r["split"] == "train"]
    val = [r for r in metrics if r["split"] == "val_clip"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert all({"step", "epoch", "loss", "lr", "clips_per_s", "data_wait"} <= set(r) for r in train)
    assert len(val) == 2 and all(0.0 <= r["top1"] <= 100.0 and r["topk"] == 5 for r in val)
    assert val[-1]["num_videos"] == 8  # 8 classes x 1 val video, each counted once
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run / "checkpoints" / name)
        assert isinstance(state["config"], dict) and state["config"]["fusion"]["K"] == 4
        assert len(state["class_names"]) == 8
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == summary["step"] == train[-1]["step"]
    assert (run / "config.yaml").is_file() and "git_commit" in json.loads((run / "run_info.json").read_text())
    end = metrics[-1]  # how the run ended, for scripts/report.py
    assert end["split"] == "end" and end["status"] == "finished" and end["step"] == summary["step"]
    assert end["wall_s"] > 0 and "error" not in end
    # The log: every train window's loss, and one closing line with what to do next.
    assert "params, all trainable |" in caplog.text  # the start-up line
    train_lines = [m for m in caplog.messages if "| train loss " in m]
    assert len(train_lines) == len(train) and f"train loss {train[-1]['loss']:.4f}" in train_lines[-1]
    best = max(val, key=lambda r: r["top1"])  # the first of equals: a later tie is not "better"
    last_line = caplog.messages[-1]
    assert last_line.startswith("training finished in ")
    assert f"best val top-1 {best['top1']:.2f} at epoch {best['epoch']}" in last_line
    assert f"final val top-1 {val[-1]['top1']:.2f} (epoch 2)" in last_line
    assert f"best.pt: {run / 'checkpoints' / 'best.pt'}" in last_line
    assert last_line.endswith(f"next: python eval.py ckpt={run / 'checkpoints' / 'best.pt'}")


def test_the_suggested_eval_command_runs_as_printed_for_a_sweeps_run_folder(tmp_path):
    # A multirun's run folders have '=' and ',' in their names, which Hydra's grammar reads as syntax.
    trainer = object.__new__(Trainer)  # only the fields the closing line reads
    trainer.ckpt_dir = tmp_path / "multirun" / "0_fusion=none,optim.lr=0.01" / "checkpoints"
    trainer.ckpt_dir.mkdir(parents=True)
    trainer.state = TrainState(best_epoch=None, best_top1=-math.inf, last_val_top1=None)
    command = shlex.split(trainer._summary_line(1.0).rsplit("next: ", 1)[1])
    assert command[:2] == ["python", "eval.py"]
    assert compose_config("eval", command[2:]).ckpt == str(trainer.ckpt_dir / "last.pt")


def test_start_up_line_says_trainable_and_total_params(data_root, tmp_path, caplog):
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 100))
    assert trainer_mod.describe_params(model) == "1.1M params, all trainable"
    model[0].requires_grad_(False)  # as backbone.freeze=true does
    assert trainer_mod.describe_params(model) == "0.1M of 1.1M params trainable"


@pytest.mark.slow
def test_resume_is_exact(data_root, tmp_path, monkeypatch):
    """An interrupted and resumed run logs the same per-step losses as an uninterrupted one."""
    extra = [
        "trainer.epochs=3",
        "trainer.num_workers=1",
        "backbone.drop_path_rate=0.2",
        "trainer.mixup=0.8",
        "trainer.cutmix=1.0",
        "trainer.ema.enabled=true",
        "trainer.ema.decay=0.9",
    ]
    full = tmp_path / "full"
    Trainer(tiny_train_config(data_root, *extra), full).fit()

    cut = tmp_path / "cut"
    original_step = Trainer.train_step

    def interrupt_after_5(self, batches):
        out = original_step(self, batches)
        if self.state.step == 5:  # mid-epoch 1 (4 steps per epoch)
            self._stop_signal = signal.SIGTERM
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupt_after_5)
    first = Trainer(tiny_train_config(data_root, *extra), cut).fit()
    assert first["status"] == "interrupted" and first["step"] == 5
    monkeypatch.setattr(Trainer, "train_step", original_step)
    second = Trainer(tiny_train_config(data_root, *extra), cut).fit()
    assert second["status"] == "finished"
    ends = [r for r in read_metrics(cut) if r["split"] == "end"]
    assert [(r["status"], r["step"]) for r in ends] == [("interrupted", 5), ("finished", 12)]

    expected, got = train_losses(full), train_losses(cut)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(cut / "checkpoints" / "last.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    for key in a["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_nonfinite_loss_stops_or_skips(data_root, tmp_path, monkeypatch):
    original = loop_mod.soft_cross_entropy
    calls = {"n": 0}

    def nan_on_third_call(logits, target):
        calls["n"] += 1
        loss = original(logits, target)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(loop_mod, "soft_cross_entropy", nan_on_third_call)
    trainer = Trainer(tiny_train_config(data_root), tmp_path / "stop")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="step 3"):
        trainer.fit()
    assert trainer.state.step == 2
    end = read_metrics(tmp_path / "stop")[-1]
    assert end["split"] == "end" and end["status"] == "crashed" and end["step"] == 2
    assert end["error"].startswith("FloatingPointError") and "step 3" in end["error"]
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())

    calls["n"] = 0
    trainer = Trainer(tiny_train_config(data_root, "trainer.nonfinite=skip"), tmp_path / "skip")
    summary = trainer.fit()
    assert summary["status"] == "finished" and trainer.state.num_skipped == 1
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())


@pytest.mark.slow
def test_wandb_offline_run_writes_its_files(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    Trainer(tiny_train_config(data_root, "logger=wandb", "trainer.epochs=1"), run).fit()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb")), "no wandb event file"
    assert (run / "wandb_run_id.txt").read_text().strip() in offline[0].name


def test_a_stop_signal_is_acted_on_at_a_step_every_rank_agreed_on(data_root, tmp_path, monkeypatch):
    # The signal arrives just after step 3's all-reduce of the (non-finite, stop, bad input) flags, so the
    # other ranks have not seen it. Stopping alone would make this rank save (collectives) while
    # the others step, and all of them would hang until torchrun kills them (as seen under load).
    # The stop must wait for the next step's all-reduce, which carries it to every rank.
    trainer = Trainer(tiny_train_config(data_root, "trainer.epochs=3", "trainer.val_every=0"), tmp_path / "run")
    real_all_reduce_sum = trainer_mod.distributed.all_reduce_sum
    flag_reductions = []

    def all_reduce_then_signal(tensor):
        out = real_all_reduce_sum(tensor)
        if tensor.numel() == 3:  # the step's flags (non-finite, stop, non-finite inputs)
            flag_reductions.append(trainer.state.step)
            if len(flag_reductions) == 3:
                trainer._on_signal(signal.SIGTERM, None)
        return out

    monkeypatch.setattr(trainer_mod.distributed, "all_reduce_sum", all_reduce_then_signal)
    summary = trainer.fit()
    assert summary["status"] == "interrupted" and summary["signal"] == signal.SIGTERM
    assert summary["step"] == 4 and flag_reductions == [0, 1, 2, 3]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes(data_root, tmp_path):
    run = tmp_path / "run"
    args = [*tiny_overrides(data_root), "trainer.epochs=6", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out, out
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    stopped_at = state["step"]
    assert stopped_at >= 3

    done = run_script("train.py", *args, cwd=tmp_path)  # the rerun, in this process (helpers/scripts.py)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout + done.stderr
    steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert steps == list(range(1, 6 * 4 + 1))  # every step logged exactly once across both processes


def test_patience_stops_when_val_stops_improving_and_best_pt_is_chosen_on_val(data_root, tmp_path, monkeypatch):
    """trainer.patience=2: validations at 50, 60, 55, 58 top-1 end the run after epoch 4 of 10 (two
    in a row without a better one); best.pt is epoch 2's, chosen by val alone; a resume stays stopped."""
    scores = iter([50.0, 60.0, 55.0, 58.0, 99.0, 99.0])
    real = loop_mod.evaluate

    def scripted(*args, **kwargs):
        result = real(*args, **kwargs)
        result.metrics["top1"] = next(scores)
        return result

    monkeypatch.setattr(loop_mod, "evaluate", scripted)
    run = tmp_path / "run"
    summary = Trainer(tiny_train_config(data_root, "trainer.epochs=10", "trainer.patience=2"), run).fit()
    assert summary["status"] == "finished" and summary["epoch"] == 4 and summary["best_val_clip_top1"] == 60.0
    vals = [r["top1"] for r in read_metrics(run) if r["split"] == "val_clip"]
    assert vals == [50.0, 60.0, 55.0, 58.0]
    (end,) = [r for r in read_metrics(run) if r["split"] == "end"]
    assert end["stopped_early"] is True and end["epoch"] == 4
    best, last = load_checkpoint(run / "checkpoints" / "best.pt"), load_checkpoint(run / "checkpoints" / "last.pt")
    assert best["epoch"] == 2 and best["best_top1"] == 60.0 and last["validations_since_best"] == 2
    # Run again in its folder: it resumes, finds the patience spent, and trains no further.
    again = Trainer(tiny_train_config(data_root, "trainer.epochs=10", "trainer.patience=2"), run).fit()
    assert again["epoch"] == 4 and next(scores) == 99.0  # no validation ran
    with pytest.raises(ValueError, match="trainer.patience"):
        check_trainer_cfg(compose_config("train", ["trainer.patience=0"]).trainer)
