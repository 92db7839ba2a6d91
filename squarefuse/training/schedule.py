"""The lr schedule, chosen by `schedule.name` (configs/schedule/): cosine, step or constant, each
after a linear warmup, stepped per optimiser update; timm's scheduler classes.

A run's schedule is described by its `spec` (the kind, the run's length, its warmup, its peak lr
and the schedule's settings): the scheduler is built from it, and a checkpoint stores it beside the
scheduler's own state, so that resume can tell whether the saved schedule is this run's
(training/resume.py: `restore_schedule`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

SCHEDULES = ("cosine", "step", "constant")


def check_schedule_cfg(schedule_cfg: DictConfig) -> None:
    """Reject values timm's schedulers would take without a word (a negative warmup); messages name the key."""
    if schedule_cfg.name not in SCHEDULES:
        raise ValueError(
            f"schedule.name must be one of {', '.join(SCHEDULES)} (schedule=...), got {schedule_cfg.name!r}"
        )

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ValueError(f"schedule.{key} must be {what}, got {schedule_cfg[key]!r}")

    need(float(schedule_cfg.warmup_epochs) >= 0, "warmup_epochs", ">= 0")
    need(float(schedule_cfg.warmup_lr) >= 0, "warmup_lr", ">= 0")
    if schedule_cfg.name == "cosine":
        need(float(schedule_cfg.min_lr) >= 0, "min_lr", ">= 0")
    if schedule_cfg.name == "step":
        need(float(schedule_cfg.decay_epochs) > 0, "decay_epochs", "> 0")
        need(0 < float(schedule_cfg.decay_rate) <= 1, "decay_rate", "in (0, 1]")


def schedule_spec(schedule_cfg: DictConfig, *, lr: float, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
    """What defines this run's schedule: plain values, saved in checkpoints and compared on resume."""
    warmup_steps = min(round(float(schedule_cfg.warmup_epochs) * steps_per_epoch), total_steps - 1)
    return {
        "kind": str(schedule_cfg.name),
        "lr": lr,  # the peak: the optimiser's scaled lr
        "total_steps": total_steps,
        "warmup_steps": max(0, warmup_steps),
        "steps_per_epoch": steps_per_epoch,
        "settings": OmegaConf.to_container(schedule_cfg, resolve=True),
    }


def build_scheduler(optimizer: Optimizer, spec: dict[str, Any]) -> Scheduler:
    """The timm scheduler of `spec`, stepped per optimiser update (`step_update(num_updates=step)`).

    The warmup goes from `warmup_lr` to the optimiser's lr in `warmup_steps`; the schedule proper
    starts after it (warmup_prefix): cosine to `min_lr` over the remaining steps, step decays by
    `decay_rate` every `decay_epochs` epochs, constant stays at the lr.
    """
    settings, warmup = spec["settings"], spec["warmup_steps"]
    warmup_args = {
        "warmup_t": warmup,
        "warmup_lr_init": float(settings["warmup_lr"]),
        "warmup_prefix": True,
        "t_in_epochs": False,
    }
    if spec["kind"] == "cosine":
        t_initial = max(1, spec["total_steps"] - warmup)
        return CosineLRScheduler(optimizer, t_initial=t_initial, lr_min=float(settings["min_lr"]), **warmup_args)
    if spec["kind"] == "step":
        decay_steps = max(1, round(float(settings["decay_epochs"]) * spec["steps_per_epoch"]))
        return StepLRScheduler(optimizer, decay_t=decay_steps, decay_rate=float(settings["decay_rate"]), **warmup_args)
    if spec["kind"] == "constant":  # a step schedule that never decays
        return StepLRScheduler(optimizer, decay_t=max(1, spec["total_steps"]), decay_rate=1.0, **warmup_args)
    raise ValueError(f"schedule.name must be one of {', '.join(SCHEDULES)}, got {spec['kind']!r}")
