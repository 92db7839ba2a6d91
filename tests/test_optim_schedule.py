"""The optimiser and the lr schedule chosen by config (optim=adamw|sgd, schedule=cosine|step|constant),
and the loop counters' state (`TrainState`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.configs import compose_config, tiny_train_config
from torch import nn

from squarefuse.config.command_line import exit_on_unreadable_overrides
from squarefuse.training.config_checks import check_train_config
from squarefuse.training.optim import build_optimizer
from squarefuse.training.schedule import build_scheduler, schedule_spec
from squarefuse.training.state import TrainState
from squarefuse.training.trainer import Trainer

LR = 0.4


def _lrs(*overrides: str, steps: list[int], total_steps: int = 100, steps_per_epoch: int = 10) -> list[float]:
    """The lr after each of `steps` optimiser updates, for the schedule `overrides` compose (peak LR)."""
    schedule_cfg = compose_config("train", list(overrides)).schedule
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    spec = schedule_spec(schedule_cfg, lr=LR, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    scheduler = build_scheduler(optimizer, spec)
    lrs = []
    for step in steps:
        scheduler.step_update(num_updates=step)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_sgd_and_adamw_are_torchs_own_optimisers_with_the_configs_settings():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    sgd_cfg = compose_config("train", ["optim=sgd", "optim.momentum=0.8", "optim.nesterov=true"]).optim
    sgd = build_optimizer(model, sgd_cfg, lr=0.05, device=torch.device("cpu"))
    assert type(sgd) is torch.optim.SGD
    assert {(g["momentum"], g["nesterov"], g["lr"]) for g in sgd.param_groups} == {(0.8, True, 0.05)}
    # No weight decay on biases and norms, the configured one on the weight matrix.
    assert sorted(g["weight_decay"] for g in sgd.param_groups) == [0.0, float(sgd_cfg.weight_decay)]
    adamw = build_optimizer(model, compose_config("train", []).optim, lr=0.05, device=torch.device("cpu"))
    assert type(adamw) is torch.optim.AdamW


def test_an_unknown_optimiser_or_schedule_is_refused_naming_the_key(data_root):
    with pytest.raises(ValueError, match=r"optim\.name must be one of adamw, sgd \(optim=\.\.\.\), got 'lamb'"):
        check_train_config(tiny_train_config(data_root, "optim.name=lamb"))
    with pytest.raises(ValueError, match=r"schedule\.name must be one of cosine, step, constant"):
        check_train_config(tiny_train_config(data_root, "schedule.name=linear"))
    with pytest.raises(ValueError, match=r"schedule\.decay_rate must be in \(0, 1\], got 2"):
        check_train_config(tiny_train_config(data_root, "schedule=step", "schedule.decay_rate=2"))


def test_step_schedule_warms_up_then_decays_every_decay_epochs():
    # 10 steps per epoch: 1 warmup epoch (10 steps from 0 to LR), then x0.5 every 2 epochs (20 steps).
    overrides = ["schedule=step", "schedule.warmup_epochs=1", "schedule.warmup_lr=0", "schedule.decay_epochs=2"]
    lrs = _lrs(*overrides, "schedule.decay_rate=0.5", steps=[0, 5, 10, 29, 30, 50, 99])
    assert lrs == pytest.approx([0.0, LR / 2, LR, LR, LR / 2, LR / 4, LR / 16])


def test_constant_schedule_warms_up_then_keeps_the_lr():
    lrs = _lrs("schedule=constant", "schedule.warmup_epochs=0.5", "schedule.warmup_lr=0", steps=[0, 1, 5, 6, 50, 99])
    assert lrs == pytest.approx([0.0, LR / 5, LR, LR, LR, LR])


def test_cosine_schedule_warms_up_then_follows_the_cosine_to_min_lr():
    lrs = _lrs("schedule.warmup_epochs=1", "schedule.warmup_lr=0", "schedule.min_lr=0", steps=[5, 10, 55, 100])
    assert lrs == pytest.approx([LR / 2, LR, LR / 2, 0.0], abs=1e-9)  # 90 cosine steps after 10 of warmup


def test_an_sgd_run_with_a_step_schedule_logs_the_step_lrs(data_root, tmp_path):
    cfg = tiny_train_config(
        data_root,
        "optim=sgd",
        "schedule=step",
        "schedule.warmup_epochs=0",
        "schedule.decay_epochs=1",
        "trainer.val_every=0",
    )
    trainer = Trainer(cfg, tmp_path / "run")
    assert type(trainer.optimizer) is torch.optim.SGD and trainer.steps_per_epoch == 4
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
    # The lr the schedule sets after each update: x0.1 at every epoch start (steps 4 and 8).
    assert lrs == pytest.approx(
        {1: trainer.lr, 2: trainer.lr, 3: trainer.lr, 4: trainer.lr / 10}
        | {s: trainer.lr / 10 for s in range(5, 8)}
        | {8: trainer.lr / 100}
    )


def test_train_state_round_trip_and_older_checkpoints():
    state = TrainState(step=7, epoch=1, batch_in_epoch=3, best_top1=50.0, best_epoch=1, num_skipped=2)
    saved = state.state_dict()
    assert TrainState.from_state_dict(saved) == state
    # A whole checkpoint will do (other keys ignored); a field it predates takes its default.
    older = {k: v for k, v in saved.items() if k != "consecutive_skips"} | {"model": {}, "world_size": 1}
    restored = TrainState.from_state_dict(older)
    assert restored == state and restored.consecutive_skips == 0
    assert TrainState().best_top1 == -math.inf


def test_a_moved_optim_key_names_its_schedule_key(capsys):
    with pytest.raises(SystemExit) as stop:
        exit_on_unreadable_overrides(["trainer.epochs=2", "optim.min_lr=0"])
    assert stop.value.code == 2
    assert "optim.min_lr is now schedule.min_lr" in capsys.readouterr().err
