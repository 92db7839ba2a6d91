"""Resuming a run: which checkpoint, what may change since it was saved, and restoring the schedule.

`resume_source` picks the checkpoint (the run folder's own, `trainer.resume`, or a fallback for a
damaged file), `check_resumed_config` refuses a changed model/data/optimisation config (the
key-by-key comparison is resume_checks.py), `check_classes` and `load_model_weights` refuse other
data or another model, and `restore_schedule` continues the saved lr schedule. The trainer calls
them in that order (`Trainer._build`, `Trainer.load_state_dict`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from timm.scheduler.scheduler import Scheduler
from torch import nn

from squarefuse.checkpoint import load_checkpoint
from squarefuse.training.resume_checks import config_changes, is_harmless

log = logging.getLogger("squarefuse")

# ------------------------------------------------------------------------------ which checkpoint


def resume_source(cfg: DictConfig, ckpt_dir: Path, *, is_main: bool) -> tuple[Path | None, dict[str, Any] | None, str]:
    """(checkpoint to resume, its state, why that one); (None, None, "") for a fresh start.

    The run's own last.pt wins over `trainer.resume` once it has got at least as far: a
    requeued or rerun job continues where it stopped instead of going back to the given file.
    A damaged last.pt is replaced by the run's newest intact checkpoint (best.pt), or by
    `trainer.resume`: a damaged file of the run never blocks resuming from another one.
    """
    own, own_state, own_why, damage = own_checkpoint(ckpt_dir, is_main=is_main)
    if not cfg.trainer.resume:
        if damage is not None and own is None:
            raise ValueError(
                f"{damage}\nThe run folder has no other intact checkpoint. Resume from another copy "
                f"with trainer.resume=PATH, or start a new run folder (hydra.run.dir=...)."
            )
        return (own, own_state, own_why) if own is not None else (None, None, "")
    path = Path(cfg.trainer.resume)
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume: checkpoint not found: {path}")
    if own is not None and path.resolve() == own.resolve():
        return own, own_state, "trainer.resume"
    given = load_checkpoint(path)
    if own is None:
        no_own = "has no intact checkpoint" if damage is not None else "has no last.pt yet"
        return path, given, f"trainer.resume (the run folder {no_own})"
    if int(own_state["step"]) >= int(given["step"]):
        return (
            own,
            own_state,
            f"the run folder's own {own.name} (step {own_state['step']}) is at least as far as "
            f"trainer.resume={path} (step {given['step']}), so the run continues where it stopped",
        )
    return (
        path,
        given,
        f"trainer.resume={path} (step {given['step']}) is further than the run folder's own {own.name} "
        f"(step {own_state['step']})",
    )


def own_checkpoint(ckpt_dir: Path, *, is_main: bool) -> tuple[Path | None, dict[str, Any] | None, str, str | None]:
    """The run folder's newest intact checkpoint: (path, state, why, what was damaged or None).

    last.pt, or best.pt when last.pt is damaged (best.pt is never further than last.pt, which is
    saved before every validation). Every file is verified (`load_checkpoint`): a flipped bit
    or a truncated file is named, and never resumed.
    """
    last, best = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    if not last.is_file():
        return None, None, "", None
    try:
        return last, load_checkpoint(last), "the run folder's own last checkpoint", None
    except ValueError as e:
        damage = str(e)
    if is_main:
        log.warning("%s", damage)
    try:
        state = load_checkpoint(best) if best.is_file() else None
    except ValueError as e:
        damage = f"{damage}\n{e}"
        state = None
        if is_main:
            log.warning("%s", e)
    if state is None:
        return None, None, "", damage
    why = (
        f"{last} is damaged; {best} (step {state['step']}) is the newest intact checkpoint of the run "
        f"(the steps after it are trained again)"
    )
    if is_main:
        log.warning("falling back: %s", why)
    return best, state, why, damage


# ------------------------------------------------------------------------------ what may change


def check_resumed_config(cfg: DictConfig, path: Path, old: dict[str, Any], *, is_main: bool) -> None:
    """Refuse a resumed run whose model/data/optimisation config differs from the checkpoint's."""
    changes = config_changes(old, OmegaConf.to_container(cfg, resolve=True))
    harmless = [c for c in changes if is_harmless(c)]
    harmful = [c for c in changes if not is_harmless(c)]
    if harmless and is_main:
        log.info("resuming %s with changed settings: %s", path, "; ".join(map(str, harmless)))
    if not harmful:
        return
    listing = "\n  ".join(map(str, harmful))
    if not cfg.trainer.allow_config_change:
        raise ValueError(
            f"resuming {path} with a config that changes the model, data or optimisation:\n  {listing}\n"
            f"Run with the checkpoint's values, start a new run folder (hydra.run.dir=...), or pass "
            f"trainer.allow_config_change=true to continue this run with the new values."
        )
    if is_main:
        log.warning(
            "resuming %s with a changed model/data/optimisation config (trainer.allow_config_change=true):\n  %s",
            path,
            listing,
        )


def check_classes(cfg: DictConfig, state: dict[str, Any], class_names: list[str], path: str | Path) -> None:
    """Refuse a checkpoint trained on other classes than the dataset of `cfg`."""
    if len(state["class_names"]) != len(class_names):
        raise ValueError(f"{path} has {len(state['class_names'])} classes but the dataset has {len(class_names)}")
    if list(state["class_names"]) != class_names and not cfg.trainer.allow_config_change:
        raise ValueError(
            f"{path} was trained on other classes (or another class order) than the dataset of this config "
            f"({cfg.dataset.name} at {cfg.dataset.root}); point dataset.* at the checkpoint's data, "
            f"or pass trainer.allow_config_change=true to continue with these classes"
        )


def load_model_weights(model: nn.Module, cfg: DictConfig, state: dict[str, Any], path: str | Path) -> None:
    """Load the checkpoint's model weights; a model of another shape is an error naming the tensors."""
    own = model.state_dict()
    theirs = state["model"]
    mismatched = [k for k in theirs if k in own and tuple(theirs[k].shape) != tuple(own[k].shape)]
    missing, unexpected = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
    if mismatched or missing or unexpected:
        problems = [f"{k}: {list(theirs[k].shape)} in the checkpoint, {list(own[k].shape)} here" for k in mismatched]
        problems += [f"{k}: not in the checkpoint" for k in missing[:10]]
        problems += [f"{k}: only in the checkpoint" for k in unexpected[:10]]
        changed = config_changes(state["config"], OmegaConf.to_container(cfg, resolve=True))
        model_keys = [str(c) for c in changed if c.key.split(".")[0] in ("backbone", "fusion", "head")]
        hint = "; the model config differs from the checkpoint's in " + ", ".join(model_keys) if model_keys else ""
        raise ValueError(
            f"{path} does not fit the model of this config{hint}:\n  "
            + "\n  ".join(problems)
            + "\nResume with the checkpoint's model config, or start a new run folder (hydra.run.dir=...) "
            "for the new model."
        )
    model.load_state_dict(theirs)


# ------------------------------------------------------------------------------ the schedule


def schedule_checkpoint(scheduler: Scheduler, spec: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint stores of the schedule: its spec (training/schedule.py) and the scheduler's own state."""
    return {"spec": spec, "state": scheduler.state_dict()}


def restore_schedule(
    scheduler: Scheduler, spec: dict[str, Any], saved: dict[str, Any], *, step: int, path: str | Path, is_main: bool
) -> None:
    """Continue the checkpoint's lr schedule at `step`, or this run's own when its length or lr differs.

    The schedule is a function of the run's length and peak lr: restoring the checkpoint's after
    `trainer.max_steps` 4 -> 12 would train steps 5-12 at the old schedule's end (min_lr); after
    a change of batch size (trainer.allow_config_change) it would use the old global batch's lr; another
    world size is refused before (`check_world_size`). This run's is kept instead.
    Another kind of schedule (`schedule.name`) cannot continue a saved one: that is refused.

    Raises:
        ValueError: the checkpoint's schedule is of another kind, naming `schedule.name`.
    """
    old = saved.get("spec")
    if old is None:
        # Saved before checkpoints described their schedule (always cosine): this run's schedule,
        # computed from the step, is the same one unless the run's length or lr changed.
        if is_main:
            log.info("%s predates saved schedule specs: this run's schedule continues at step %d", path, step)
    elif old["kind"] != spec["kind"]:
        raise ValueError(
            f"{path} was trained with schedule.name={old['kind']}, and this run has schedule.name={spec['kind']}: "
            f"a {spec['kind']} schedule cannot continue a {old['kind']} one. Resume with "
            f"schedule={old['kind']}, or start a new run folder (hydra.run.dir=...) for the new schedule."
        )
    elif old == spec:
        scheduler.load_state_dict(saved["state"])
    elif is_main:
        log.warning(
            "%s was saved with an lr schedule of %d steps (%d warmup) peaking at lr %.2e; this run has %d "
            "steps (%d warmup) at lr %.2e (the run length, batch, training list or optim/schedule settings "
            "changed): the schedule is rebuilt for this run's length and lr",
            path,
            old["total_steps"],
            old["warmup_steps"],
            old["lr"],
            spec["total_steps"],
            spec["warmup_steps"],
            spec["lr"],
        )
    # The optimiser's lr is the one the saved schedule set; set the one of the schedule in use.
    scheduler.step_update(num_updates=step)


def check_world_size(state: dict[str, Any], world_size: int, clips_per_rank_step: int, path: str | Path) -> None:
    """Refuse a checkpoint saved with another number of processes.

    The world size sets the clips of an optimiser step (and so the lr, the steps of an epoch and of
    the schedule) and which rank sees which sample: resumed with another one, the run could neither
    see the rest of the interrupted epoch nor stay at its point of the lr schedule (it used to skip
    to the next epoch, rebuild the schedule counting the steps done, and train past trainer.epochs).
    """
    saved = int(state["world_size"])
    if saved == world_size:
        return
    old = state.get("config", {}).get("trainer", {})
    micro, accum = old.get("batch_size", "?"), old.get("accum_steps", "?")
    old_global = int(micro) * int(accum) * saved if str(micro).isdigit() and str(accum).isdigit() else "?"
    raise ValueError(
        f"{path} was saved by a run of world size {saved} (global batch {micro} x {accum} x {saved} = "
        f"{old_global} clips a step, at step {state['step']}: epoch {state['epoch']}, "
        f"micro-batch {state['batch_in_epoch']} of it); this run has world size {world_size} (global batch "
        f"{clips_per_rank_step * world_size}). Resumed with another number of processes the run would "
        f"not see the rest of its epoch's samples nor keep its place in the lr schedule. Resume with world "
        f"size {saved} (e.g. torchrun --nproc_per_node={saved} on one node), or start a new run folder "
        f"from its weights: hydra.run.dir=NEW_FOLDER trainer.init_from={path}"
    )


def check_training_list(cfg: DictConfig, state: dict[str, Any], current: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint trained on another training list (videos added, removed or relabelled since),
    unless `trainer.allow_config_change`; checkpoints saved before the list was recorded pass."""
    saved = state.get("training_list")
    if saved is None or saved == current or cfg.trainer.allow_config_change:
        return
    raise ValueError(
        f"{path} was trained on another training list than this run's ({saved['videos']} videos "
        f"then, {current['videos']} now; sha256 of the (video, label) pairs "
        f"{saved['sha256'][:12]} -> {current['sha256'][:12]}): dataset.train_file "
        "(or the videos found) changed since the checkpoint, videos added, removed or relabelled. Restore "
        "it, start a new run folder (hydra.run.dir=...), or pass trainer.allow_config_change=true"
    )
