"""The training loop: read it top to bottom.

`Trainer.fit` runs epochs of optimiser steps (each `accum_steps` micro-batches), validates at the
clip level at epoch ends, keeps `last.pt` / `best.pt`, and stops cleanly on SIGTERM/SIGINT after
saving. Everything needed to continue exactly where it stopped is in `state_dict()`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from squarefuse.checkpoint import load_checkpoint, save_checkpoint
from squarefuse.config.compose_config import shell_override
from squarefuse.datasets import build_dataset, build_device_augment, build_gpu_decoder
from squarefuse.datasets.build import check_run_dir
from squarefuse.datasets.preprocess import input_normalizer
from squarefuse.datasets.token_cache import apply_cache_to_config
from squarefuse.evaluation.evaluator import evaluate, name_videos
from squarefuse.evaluation.metrics import top5_name
from squarefuse.evaluation.video_batches import BatchSettings
from squarefuse.models import build_classifier
from squarefuse.models.complexity import format_model_info, model_complexity, write_model_info
from squarefuse.runtime import distributed
from squarefuse.runtime.atomic_file import check_writable, remove_stale_temp_files
from squarefuse.runtime.launch_env import env_dist_info
from squarefuse.runtime.precision import autocast, resolve_precision
from squarefuse.runtime.workers import (
    ignore_stop_signals,
    private_generator,
    resolve_cpu_threads,
    resolve_num_workers,
    shutdown_workers,
)
from squarefuse.training.init_from import apply_init_from, backbone_cfg_for_run, check_init_file
from squarefuse.training.metrics_log import MetricsLogger
from squarefuse.training.optim import build_optimizer, build_scheduler, check_optim_cfg, scaled_lr
from squarefuse.training.resume_checks import config_changes, is_harmless
from squarefuse.training.run_lock import RunLock
from squarefuse.training.sample_order import ResumableSampler, SeededDataset

log = logging.getLogger("squarefuse")

# SIGTERM/SIGINT: stop after the first step whose all-reduce carries it to every rank, and save;
# SIGUSR2: SLURM's (submitit's) warning before preemption or the time limit, the same and then requeue.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

# The loader is called the bottleneck when the step waits this long for data, on average.
DATA_BOUND_SHARE = 0.3

# What defines the lr schedule in the timm scheduler's state; the rest is the position in it.
SCHEDULE_KEYS = ("t_initial", "warmup_t", "lr_min", "warmup_lr_init", "base_values")


def check_trainer_cfg(tcfg: DictConfig) -> None:
    """Reject values that would fail late or silently misbehave; messages name the key."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ValueError(f"trainer.{key} must be {what}, got {tcfg[key]!r}")

    need(int(tcfg.epochs) >= 1, "epochs", ">= 1")
    need(tcfg.max_steps is None or int(tcfg.max_steps) >= 1, "max_steps", "null or >= 1")
    need(int(tcfg.batch_size) >= 1, "batch_size", ">= 1")
    need(int(tcfg.prefetch_factor) >= 1, "prefetch_factor", ">= 1")
    need(int(tcfg.accum_steps) >= 1, "accum_steps", ">= 1")
    need(tcfg.nonfinite in ("stop", "skip"), "nonfinite", "stop or skip")
    need(int(tcfg.max_consecutive_skips) >= 1, "max_consecutive_skips", ">= 1")
    need(isinstance(tcfg.allow_config_change, bool), "allow_config_change", "true or false")
    need(tcfg.precision in ("auto", "bf16", "fp16", "fp32"), "precision", "auto, bf16, fp16 or fp32")
    need(float(tcfg.mixup) >= 0 and float(tcfg.cutmix) >= 0, "mixup", ">= 0 (and so must trainer.cutmix)")
    need(0.0 <= float(tcfg.mixup_prob) <= 1.0, "mixup_prob", "in [0, 1]")
    need(0.0 <= float(tcfg.label_smoothing) < 1.0, "label_smoothing", "in [0, 1)")
    need(tcfg.clip_grad is None or float(tcfg.clip_grad) > 0, "clip_grad", "null or > 0")
    need(int(tcfg.log_every) >= 1, "log_every", ">= 1")
    need(int(tcfg.ckpt_every) >= 1, "ckpt_every", ">= 1")
    need(int(tcfg.val_every) >= 0, "val_every", ">= 0")
    need(0.0 < float(tcfg.ema.decay) < 1.0, "ema", "a mapping with decay in (0, 1)")


def check_train_config(cfg: DictConfig) -> None:
    """Every check that needs no data and no device, run before anything is created.

    The trainer and optimiser keys, and the model: the backbone, fusion and head are built on the
    meta device (no memory, no weights read), so each layer's own argument checks (`fusion.K=0`,
    `fusion.quantiles=[0.1,1.5]`...) run before the data is generated or a file is written.

    With `dataset=tokens` it first reads the cache's `cache.json` and fills the run's config with the
    cache's settings (`apply_cache_to_config`): the model is built from them. Calling it again is
    harmless (the filled-in values equal the cache's).

    Raises:
        ValueError: naming the key and its value.
    """
    apply_cache_to_config(cfg)
    tcfg = cfg.trainer
    if cfg.dataset.name == "tokens" and (float(tcfg.mixup) > 0 or float(tcfg.cutmix) > 0):
        raise ValueError(
            f"trainer.mixup={tcfg.mixup}, trainer.cutmix={tcfg.cutmix}: MixUp/CutMix mix pixels, and a run on "
            "cached tokens (dataset=tokens) has none; set both to 0"
        )
    if cfg.dataset.name == "tokens" and str(cfg.head.get("_target_", "")).endswith(".MeanHead"):
        patches = int(cfg.backbone.model_kwargs.num_tokens) - int(cfg.backbone.model_kwargs.num_prefix_tokens)
        if patches < 1:
            raise ValueError(
                f"head=mean averages the patch tokens, and the token cache {cfg.dataset.root} holds none "
                f"(dataset.tokens={cfg.dataset.tokens}: its prefix tokens only): use head=cls"
            )
    check_trainer_cfg(tcfg)
    check_optim_cfg(cfg.optim)
    backbone_cfg = OmegaConf.merge(cfg.backbone, {"pretrained": False, "pretrained_path": None})
    with torch.device("meta"):
        build_classifier(backbone_cfg, cfg.fusion, cfg.head, num_classes=2)  # any class count will do


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists (readable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def describe_recipe(cfg: DictConfig) -> str:
    """The start-up line that says which recipe runs and where its backbone's weights come from."""
    backbone = cfg.backbone
    if not backbone.pretrained:
        weights = "trained from scratch"
    elif backbone.pretrained_path is not None:
        weights = f"pretrained weights from backbone.pretrained_path={backbone.pretrained_path}"
    else:
        weights = "pretrained weights from the Hugging Face hub (offline: set backbone.pretrained_path)"
    head = str(cfg.head._target_).rsplit(".", 1)[-1]
    return (
        f"recipe {cfg.recipe} (configs/recipe/{cfg.recipe}.yaml; recipe=... swaps it): "
        f"backbone {backbone.name} at {backbone.img_size} px, {weights}; head {head}"
    )


class Trainer:
    """Owns the model, data, optimiser and loop of one training run."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        # One job per run folder, held by rank 0 from before anything in it is read (last.pt) or
        # written, until `close` (the end of `fit`), a failure below, garbage collection or exit.
        self.run_lock = RunLock(run_dir) if env_dist_info().is_main else None
        if self.run_lock is not None:
            self.run_lock.acquire()
            weakref.finalize(self, self.run_lock.release)
        try:
            self._build(cfg, run_dir)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        tcfg = cfg.trainer
        check_train_config(cfg)
        check_run_dir(cfg.dataset, self.run_dir)
        if tcfg.init_from is not None and not tcfg.resume and not (self.ckpt_dir / "last.pt").is_file():
            check_init_file(tcfg.init_from)  # a fresh run will read it: a wrong file fails before the data is built
        self.num_workers = resolve_num_workers(tcfg.num_workers, key="trainer.num_workers")
        self.dist, self.device = distributed.init_distributed(tcfg.device)
        self.precision = resolve_precision(tcfg.precision, self.device)
        threads = resolve_cpu_threads(tcfg.cpu_threads, num_workers=self.num_workers, key="trainer.cpu_threads")
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)
        is_main = self.dist.is_main
        if is_main:
            log.info(describe_recipe(cfg))
            # Now, not at the first save after an epoch of work. The run lock (held) wrote run.lock
            # into the run folder already; checkpoints/ may be another (read-only, full) mount.
            check_writable(self.ckpt_dir, "the run's checkpoints (last.pt, best.pt)")
            # Saves killed mid-write (SIGKILL, a node failure) leave their temporary files; the run
            # lock guarantees that no other job writes into this folder, so they are all dead.
            stale = remove_stale_temp_files(self.ckpt_dir) + remove_stale_temp_files(self.run_dir)
            if stale:
                log.info("removed %d temporary files of interrupted saves: %s", len(stale), ", ".join(map(str, stale)))
        # Each rank its own model-side randomness (drop path, MixUp); data randomness is per sample.
        torch.manual_seed(int(tcfg.seed) + self.dist.rank)
        random.seed(int(tcfg.seed) + self.dist.rank)
        np.random.seed(int(tcfg.seed) + self.dist.rank)

        # Data. Only rank 0 writes reports; the others wait so that one process generates data.
        report_dir = self.run_dir if is_main else None
        if is_main:
            self.train_set = build_dataset(cfg.dataset, "train", report_dir=report_dir)
        distributed.barrier()
        if not is_main:
            self.train_set = build_dataset(cfg.dataset, "train", report_dir=None)
        self.val_set = build_dataset(cfg.dataset, "val", views=False, report_dir=report_dir) if tcfg.val_every else None
        self.num_classes = self.train_set.num_classes
        self.class_names = list(self.train_set.class_names)
        self.micro_batch = int(tcfg.batch_size)
        self.accum = int(tcfg.accum_steps)
        self.sampler = ResumableSampler(
            len(self.train_set), seed=int(tcfg.seed), rank=self.dist.rank, world_size=self.dist.world_size
        )
        self.steps_per_epoch = self.sampler.per_rank // (self.micro_batch * self.accum)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"trainer.batch_size={self.micro_batch} x accum_steps={self.accum} is larger than the "
                f"{self.sampler.per_rank} training videos per rank: lower trainer.batch_size"
            )
        self.loader = DataLoader(
            SeededDataset(self.train_set),
            batch_size=self.micro_batch,
            sampler=self.sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=int(tcfg.prefetch_factor) if self.num_workers > 0 else None,
            worker_init_fn=ignore_stop_signals,
            generator=private_generator(int(tcfg.seed)),
        )

        # Model, EMA (after .to(device), before DDP), compile.
        # Weights from a file (trainer.init_from, or a resumed checkpoint) need no pretrained backbone.
        # init_from (fine-tuning): weights only, loaded before EMA copies them; a resumed run ignores it.
        resume_from, state, why = self._resume_source()
        backbone_cfg = backbone_cfg_for_run(cfg.backbone, tcfg.init_from, resume_from=resume_from)
        self.model = build_classifier(backbone_cfg, cfg.fusion, cfg.head, self.num_classes).to(self.device)
        apply_init_from(
            self.model,
            tcfg.init_from,
            allow_mismatch=bool(tcfg.init_allow_mismatch),
            resume_from=resume_from,
            report_dir=self.run_dir if is_main else None,
        )
        self.normalizer = input_normalizer(self.model.mean, self.model.std, self.device)
        self.device_augment = build_device_augment(cfg.dataset)
        self.gpu_decoder = build_gpu_decoder(self.train_set, self.device)  # dataset.decode_device=cuda
        self.ema = ModelEmaV3(self.model, decay=float(tcfg.ema.decay)) if tcfg.ema.enabled else None
        self.train_model = self.model
        if self.dist.is_distributed:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.forward = torch.compile(self.train_model) if tcfg.compile else self.train_model

        # Optimisation.
        self.global_batch = self.micro_batch * self.accum * self.dist.world_size
        self.lr = scaled_lr(cfg.optim, self.global_batch)
        self.total_steps = int(tcfg.epochs) * self.steps_per_epoch
        if tcfg.max_steps is not None:
            self.total_steps = min(self.total_steps, int(tcfg.max_steps))
        warmup_steps = min(round(float(cfg.optim.warmup_epochs) * self.steps_per_epoch), self.total_steps - 1)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.lr, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps, max(0, warmup_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.mix = self._build_mix(tcfg)

        # Loop state (all of it is in the checkpoint).
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this rank done in the current epoch
        self.best_top1 = -math.inf
        self.best_epoch: int | None = None
        self.last_val_top1: float | None = None
        self.last_val_step = -1
        self.num_replaced = 0
        self.num_skipped = 0
        self.consecutive_skips = 0
        # The signal this process received, and the stop every rank agreed on (set after a step's
        # all-reduce, never by the handler): a rank that acted on its own signal while another's
        # had not arrived yet would save (collectives) while the other stepped, and both would hang.
        self._signal_received: int | None = None
        self._stop_signal: int | None = None
        self._data_bound_reported = False

        if resume_from is not None:
            self._check_resumed_config(resume_from, state["config"])
            self.load_state_dict(state, path=resume_from)
            del state
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d): %s",
                resume_from,
                self.step,
                self.epoch,
                self.batch_in_epoch,
                why,
            )
        self.logger = MetricsLogger(
            self.run_dir,
            cfg,
            enabled=is_main,
            resume=resume_from is not None,
            resume_step=self.step if resume_from is not None else None,
            resume_val_step=self.last_val_step,
        )
        if is_main:
            log.info(
                "run dir %s | %d train / %s val videos, %d classes | %s | global batch %d, lr %.2e | "
                "%d steps (%d per epoch) | %s (%d threads), %s, %d workers/rank, world size %d",
                self.run_dir,
                len(self.train_set),
                len(self.val_set) if self.val_set else 0,
                self.num_classes,
                describe_params(self.model),
                self.global_batch,
                max(self.scheduler.base_values),  # the peak lr of the schedule in use (a resumed one's too)
                self.total_steps,
                self.steps_per_epoch,
                self.device,
                torch.get_num_threads(),
                self.precision,
                self.num_workers,
                self.dist.world_size,
            )
            model_info = model_complexity(self.model, int(cfg.dataset.num_frames), self.model.backbone.img_size)
            write_model_info(model_info, self.run_dir / "model_info.json")
            log.info(format_model_info(model_info))

    # ----------------------------------------------------------------------------------- setup

    def _build_mix(self, tcfg: DictConfig):
        choices = []
        if float(tcfg.mixup) > 0:
            choices.append(v2.MixUp(alpha=float(tcfg.mixup), num_classes=self.num_classes))
        if float(tcfg.cutmix) > 0:
            choices.append(v2.CutMix(alpha=float(tcfg.cutmix), num_classes=self.num_classes))
        return v2.RandomChoice(choices) if choices else None

    def _resume_source(self) -> tuple[Path | None, dict[str, Any] | None, str]:
        """(checkpoint to resume, its state, why that one); (None, None, "") for a fresh start.

        The run's own last.pt wins over `trainer.resume` once it has got at least as far: a
        requeued or rerun job continues where it stopped instead of going back to the given file.
        A damaged last.pt is replaced by the run's newest intact checkpoint (best.pt), or by
        `trainer.resume`: a damaged file of the run never blocks resuming from another one.
        """
        own, own_state, own_why, damage = self._own_checkpoint()
        if not self.cfg.trainer.resume:
            if damage is not None and own is None:
                raise ValueError(
                    f"{damage}\nThe run folder has no other intact checkpoint. Resume from another copy "
                    f"with trainer.resume=PATH, or start a new run folder (hydra.run.dir=...)."
                )
            return (own, own_state, own_why) if own is not None else (None, None, "")
        path = Path(self.cfg.trainer.resume)
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

    def _own_checkpoint(self) -> tuple[Path | None, dict[str, Any] | None, str, str | None]:
        """The run folder's newest intact checkpoint: (path, state, why, what was damaged or None).

        last.pt, or best.pt when last.pt is damaged (best.pt is never further than last.pt, which is
        saved before every validation). Every file is verified (`load_checkpoint`): a flipped bit
        or a truncated file is named, and never resumed.
        """
        last, best = self.ckpt_dir / "last.pt", self.ckpt_dir / "best.pt"
        if not last.is_file():
            return None, None, "", None
        try:
            return last, load_checkpoint(last), "the run folder's own last checkpoint", None
        except ValueError as e:
            damage = str(e)
        if self.dist.is_main:
            log.warning("%s", damage)
        try:
            state = load_checkpoint(best) if best.is_file() else None
        except ValueError as e:
            damage = f"{damage}\n{e}"
            state = None
            if self.dist.is_main:
                log.warning("%s", e)
        if state is None:
            return None, None, "", damage
        why = (
            f"{last} is damaged; {best} (step {state['step']}) is the newest intact checkpoint of the run "
            f"(the steps after it are trained again)"
        )
        if self.dist.is_main:
            log.warning("falling back: %s", why)
        return best, state, why, damage

    def _check_resumed_config(self, path: Path, old: dict[str, Any]) -> None:
        """Refuse a resumed run whose model/data/optimisation config differs from the checkpoint's."""
        changes = config_changes(old, OmegaConf.to_container(self.cfg, resolve=True))
        harmless = [c for c in changes if is_harmless(c)]
        harmful = [c for c in changes if not is_harmless(c)]
        if harmless and self.dist.is_main:
            log.info("resuming %s with changed settings: %s", path, "; ".join(map(str, harmless)))
        if not harmful:
            return
        listing = "\n  ".join(map(str, harmful))
        if not self.cfg.trainer.allow_config_change:
            raise ValueError(
                f"resuming {path} with a config that changes the model, data or optimisation:\n  {listing}\n"
                f"Run with the checkpoint's values, start a new run folder (hydra.run.dir=...), or pass "
                f"trainer.allow_config_change=true to continue this run with the new values."
            )
        if self.dist.is_main:
            log.warning(
                "resuming %s with a changed model/data/optimisation config (trainer.allow_config_change=true):\n  %s",
                path,
                listing,
            )

    # ------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        rng = distributed.all_gather_objects(_rng_state())
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "last_val_top1": self.last_val_top1,
            "last_val_step": self.last_val_step,
            "num_replaced": self.num_replaced,
            "num_skipped": self.num_skipped,
            "consecutive_skips": self.consecutive_skips,
            "world_size": self.dist.world_size,
            "rng": rng,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "class_names": self.class_names,
        }

    def load_state_dict(self, state: dict[str, Any], *, path: str | Path = "the checkpoint") -> None:
        if len(state["class_names"]) != self.num_classes:
            raise ValueError(f"{path} has {len(state['class_names'])} classes but the dataset has {self.num_classes}")
        if list(state["class_names"]) != self.class_names and not self.cfg.trainer.allow_config_change:
            raise ValueError(
                f"{path} was trained on other classes (or another class order) than the dataset of this config "
                f"({self.cfg.dataset.name} at {self.cfg.dataset.root}); point dataset.* at the checkpoint's data, "
                f"or pass trainer.allow_config_change=true to continue with these classes"
            )
        self._load_model_weights(state, path)
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self._restore_schedule(state["scheduler"], path)
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.best_top1 = float(state["best_top1"])
        self.best_epoch = state.get("best_epoch")  # absent from checkpoints saved before it was recorded
        self.last_val_top1 = state.get("last_val_top1")
        self.last_val_step = int(state["last_val_step"])
        self.num_replaced, self.num_skipped = int(state["num_replaced"]), int(state["num_skipped"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        if int(state["world_size"]) == self.dist.world_size:
            _set_rng_state(state["rng"][self.dist.rank])
        else:
            # The epoch order changes with the world size anyway; resume at the next epoch start.
            log.warning(
                "resuming a world-size %d checkpoint with world size %d: continuing from the start of epoch %d",
                state["world_size"],
                self.dist.world_size,
                self.epoch + (self.batch_in_epoch > 0),
            )
            if self.batch_in_epoch > 0:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _restore_schedule(self, saved: dict[str, Any], path: str | Path) -> None:
        """Continue the checkpoint's lr schedule, or this run's own when its length or lr differs.

        The schedule is a function of the run's length and peak lr: restoring the checkpoint's after
        `trainer.max_steps` 4 -> 12 would train steps 5-12 at the old schedule's end (min_lr); after
        a change of world size it would use the old global batch's lr. This run's is rebuilt instead.
        """
        fresh = self.scheduler.state_dict()
        if all(saved.get(k) == fresh.get(k) for k in SCHEDULE_KEYS):
            self.scheduler.load_state_dict(saved)
        elif self.dist.is_main:
            old_steps = int(saved.get("t_initial", 0)) + int(saved.get("warmup_t", 0))
            old_lr = max(saved.get("base_values") or [math.nan])
            log.warning(
                "%s was saved with an lr schedule of %d steps (%d warmup) peaking at lr %.2e; this run has %d "
                "steps (%d warmup) at lr %.2e (the run length, world size, batch or optim settings changed): "
                "the schedule is rebuilt for this run's length and lr",
                path,
                old_steps,
                int(saved.get("warmup_t", 0)),
                old_lr,
                self.total_steps,
                int(fresh["warmup_t"]),
                self.lr,
            )
        # The optimiser's lr is the one the saved schedule set; set the one of the schedule in use.
        self.scheduler.step_update(num_updates=self.step)

    def _load_model_weights(self, state: dict[str, Any], path: str | Path) -> None:
        """Load the model (and EMA) weights; a model of another shape is an error naming the tensors."""
        own = self.model.state_dict()
        theirs = state["model"]
        mismatched = [k for k in theirs if k in own and tuple(theirs[k].shape) != tuple(own[k].shape)]
        missing, unexpected = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
        if mismatched or missing or unexpected:
            problems = [
                f"{k}: {list(theirs[k].shape)} in the checkpoint, {list(own[k].shape)} here" for k in mismatched
            ]
            problems += [f"{k}: not in the checkpoint" for k in missing[:10]]
            problems += [f"{k}: only in the checkpoint" for k in unexpected[:10]]
            changed = config_changes(state["config"], OmegaConf.to_container(self.cfg, resolve=True))
            model_keys = [str(c) for c in changed if c.key.split(".")[0] in ("backbone", "fusion", "head")]
            hint = "; the model config differs from the checkpoint's in " + ", ".join(model_keys) if model_keys else ""
            raise ValueError(
                f"{path} does not fit the model of this config{hint}:\n  "
                + "\n  ".join(problems)
                + "\nResume with the checkpoint's model config, or start a new run folder (hydra.run.dir=...) "
                "for the new model."
            )
        self.model.load_state_dict(theirs)

    def save(self, name: str) -> None:
        state = self.state_dict()  # a collective (RNG gather): every rank calls it
        if self.dist.is_main:
            save_checkpoint(state, self.ckpt_dir / name)
        distributed.barrier()

    # ------------------------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to a stop signal); return a summary.

        However it ends, the last record of metrics.jsonl says how (`split: end`, status finished,
        interrupted or crashed, this session's wall time): what `scripts/report.py` reads.
        """
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        started, status, error = time.perf_counter(), "crashed", None
        try:
            if self.epoch > 0 and self.batch_in_epoch == 0 and self._validation_due():
                self._validate_and_save()  # resumed from an epoch end whose validation did not finish
            while self.step < self.total_steps and self._stop_signal is None:
                self.train_epoch()
                if self._stop_signal is not None:
                    break
                if self.batch_in_epoch >= self.steps_per_epoch * self.accum:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    # The epoch is saved before its validation runs, so a failing one loses nothing.
                    self.save("last.pt")
                    if self._validation_due():
                        self._validate_and_save()
            if self._stop_signal is not None:
                self.save("last.pt")
                if self.dist.is_main:
                    log.warning(
                        "stopped by %s at step %d: saved %s; run the same command again to resume",
                        signal.Signals(self._stop_signal).name,
                        self.step,
                        self.ckpt_dir / "last.pt",
                    )
                status = "interrupted"
                # submitit's preemption/timeout handler (SIGUSR2): now that the checkpoint is safe,
                # let it requeue the job (rank 0) — the requeued job resumes from last.pt.
                handler = previous.get(self._stop_signal)
                if self._stop_signal == signal.SIGUSR2 and callable(handler):
                    handler(self._stop_signal, None)
            else:
                self.save("last.pt")
                if self.val_set is not None and self.last_val_step != self.step:
                    self._validate_and_save()  # training ended mid-epoch (max_steps): validate the final weights
                status = "finished"
                if self.dist.is_main:
                    log.info(self._summary_line(time.perf_counter() - started))
        except BaseException as e:
            if status == "crashed":  # not the requeue handler's exit after a clean stop
                error = f"{type(e).__name__}: {e}"
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            end = {"step": self.step, "epoch": self.epoch, "split": "end", "status": status}
            self.logger.log({**end, "wall_s": time.perf_counter() - started, **({"error": error} if error else {})})
            self.logger.close()
            self.close()
        return {
            "status": "interrupted" if self._stop_signal is not None else "finished",
            "signal": self._stop_signal,
            "step": self.step,
            "epoch": self.epoch,
            "best_val_clip_top1": self.best_top1 if self.best_top1 > -math.inf else None,
            "run_dir": str(self.run_dir),
        }

    def _summary_line(self, wall_s: float) -> str:
        """The last line of a finished run: its best and final validation, wall time, and what to run next."""
        minutes, seconds = divmod(round(wall_s), 60)
        parts = [f"training finished in {minutes}m {seconds:02d}s"]
        best = self.ckpt_dir / "best.pt"
        if self.best_epoch is not None or self.best_top1 > -math.inf:
            at = f" at epoch {self.best_epoch}" if self.best_epoch is not None else ""
            parts.append(f"best clip-level val top-1 {self.best_top1:.2f}{at}")
        if self.last_val_top1 is not None:
            parts.append(f"final val top-1 {self.last_val_top1:.2f} (epoch {self.epoch})")
        if not best.is_file():
            parts.append("no validation, no best.pt")
            best = self.ckpt_dir / "last.pt"
        parts.append(f"{best.name}: {best}")
        parts.append(f"next: python eval.py {shell_override('ckpt', _short_path(best))}")
        return " | ".join(parts)

    def close(self) -> None:
        """Stop the loader's workers and release the run folder (`fit` does both when it ends)."""
        # Workers ignore SIGTERM: stop them here, or an error would leave the process waiting for
        # them in multiprocessing's exit handler forever (see runtime/workers.py).
        if hasattr(self, "loader"):  # not yet when __init__ fails early
            shutdown_workers(self.loader)
        if self.run_lock is not None:
            self.run_lock.release()

    def _validation_due(self) -> bool:
        """At an epoch end: does this epoch validate (every val_every epochs, and the last one)?"""
        val_every = int(self.cfg.trainer.val_every)
        return (
            self.val_set is not None
            and val_every > 0
            and self.last_val_step != self.step
            and (self.epoch % val_every == 0 or self.step >= self.total_steps)
        )

    def _validate_and_save(self) -> None:
        self.validate()
        self.save("last.pt")  # again, now with the validation's outcome (best top-1, last_val_step)

    def _on_signal(self, signum: int, frame) -> None:
        if self._signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._signal_received = signum

    def train_epoch(self) -> None:
        """Optimiser steps until the epoch ends, training ends, or a stop is requested."""
        tcfg = self.cfg.trainer
        self.model.train()
        self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.micro_batch)
        steps_left = min(self.steps_per_epoch - self.batch_in_epoch // self.accum, self.total_steps - self.step)
        batches = iter(self.loader)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.batch_in_epoch // self.accum,
            desc=f"epoch {self.epoch}",
            disable=not self.dist.is_main,
            dynamic_ncols=True,
            leave=False,
        )
        # Log lines (the train loss among them) are printed above the progress bar, not through it.
        with logging_redirect_tqdm():
            window = self._new_window()
            t_last = time.perf_counter()
            for _ in range(steps_left):
                loss, wait = self.train_step(batches)
                now = time.perf_counter()
                if loss is None:
                    window["skipped"] += 1
                else:
                    window["loss"] += loss
                window["steps"] += 1
                window["wait"] += wait
                window["time"] += now - t_last
                t_last = now
                bar.update(1)
                if self.step % int(tcfg.log_every) == 0 or self.step == self.total_steps:
                    self._log_train(window, bar)
                    window = self._new_window()
                if self._stop_signal is not None:
                    break
                if self.step % int(tcfg.ckpt_every) == 0:
                    self.save("last.pt")
        bar.close()

    def _new_window(self) -> dict[str, Any]:
        """Sums over the steps since the last train log line (loss over the steps not skipped)."""
        return {"loss": torch.zeros((), device=self.device), "steps": 0, "skipped": 0, "wait": 0.0, "time": 0.0}

    def train_step(self, batches) -> tuple[torch.Tensor | None, float]:
        """One optimiser step over `accum_steps` micro-batches.

        Returns (mean loss, or None for a step skipped for a non-finite loss; seconds waiting for data).
        """
        tcfg = self.cfg.trainer
        wait = 0.0
        loss_sum = torch.zeros((), device=self.device)
        finite_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dataset indices, finite per video)
        for micro in range(self.accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            video, mask, target = self._prepare(batch)
            if batch.get("video") is not None and batch["video"].is_floating_point():  # cached tokens (pixels: uint8)
                finite_inputs.append((batch["index"], video.isfinite().reshape(len(batch["index"]), -1).all(dim=1)))
            last_micro = micro == self.accum - 1
            no_sync = (
                self.train_model.no_sync()
                if (self.dist.is_distributed and not last_micro)
                else contextlib.nullcontext()
            )
            with no_sync:
                with autocast(self.device, self.precision):
                    logits = self.forward(video, mask)
                loss = soft_cross_entropy(logits, target)
                self.scaler.scale(loss / self.accum).backward()
            loss_sum += loss.detach()
            self.batch_in_epoch += 1
        loss_mean = loss_sum / self.accum

        # Every rank must take the same decision: one tiny all-reduce of (non-finite, stop, non-finite
        # inputs) flags. Non-finite inputs (a damaged token cache) make a step non-finite even when the
        # loss is not: their gradients would turn the weights NaN and the next, clean batch would be
        # blamed. MixUp is refused on cached tokens, so a flagged input is the video itself.
        bad_inputs = [int(i) for index, ok in finite_inputs for i in index[~ok.cpu()]] if finite_inputs else []
        flags = torch.tensor(
            [
                float(bool(bad_inputs) or not torch.isfinite(loss_mean)),
                float(self._signal_received is not None),
                float(bool(bad_inputs)),
            ],
            device=self.device,
        )
        flags = distributed.all_reduce_sum(flags)
        if flags[1] > 0 and self._stop_signal is None:
            self._stop_signal = self._signal_received or signal.SIGTERM
        if flags[0] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss"
            advice = "Lower optim.lr, set trainer.clip_grad, use trainer.precision=bf16/fp32, or trainer.nonfinite=skip"
            if flags[2] > 0:  # the data, not the optimiser: say which videos
                what = "inputs"
                records = getattr(self.train_set, "records", None)
                names = [records[i].path if records is not None else f"index {i}" for i in bad_inputs]
                advice = (
                    f"The batch's inputs hold NaN or infinite values ({name_videos(names) or 'on another rank'}): "
                    "the data is damaged, not the learning rate; make the token cache again (scripts/cache_tokens.py)"
                )
            if tcfg.nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite {what} at step {self.step + 1} (epoch {self.epoch}); the weights were not "
                    f"updated and {self.ckpt_dir / 'last.pt'} is the last good checkpoint. {advice}"
                )
            # A skipped step still counts: the schedule, max_steps and the epochs end as planned.
            self.step += 1
            self.scheduler.step_update(num_updates=self.step)
            self.num_skipped += 1
            self.consecutive_skips += 1
            limit = int(tcfg.max_consecutive_skips)
            if self.consecutive_skips > limit:
                raise FloatingPointError(
                    f"non-finite loss in {self.consecutive_skips} steps in a row (steps "
                    f"{self.step - self.consecutive_skips + 1} to {self.step}, epoch {self.epoch}), more than "
                    f"trainer.max_consecutive_skips={limit}: stopping. The weights were not updated by these steps; "
                    f"{self.ckpt_dir / 'last.pt'} is the last checkpoint. Lower optim.lr, set trainer.clip_grad, "
                    f"use trainer.precision=bf16/fp32, or check the data"
                )
            if self.dist.is_main:
                log.warning(
                    "non-finite %s at step %d: step skipped (%d so far, %d in a row)%s",
                    what,
                    self.step,
                    self.num_skipped,
                    self.consecutive_skips,
                    f". {advice}" if flags[2] > 0 else "",
                )
            return None, wait
        self.consecutive_skips = 0

        if tcfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(tcfg.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.scheduler.step_update(num_updates=self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return loss_mean, wait

    def _prepare(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 batch -> device -> float normalised -> MixUp/CutMix; targets are soft labels."""
        mask = batch["mask"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        self.num_replaced += int(batch["num_replaced"].sum())
        if self.gpu_decoder is not None:  # the workers sampled, the GPU decodes and crops
            video, replaced = self.gpu_decoder(batch["path"], batch["frame_index"])
            self.num_replaced += replaced
            if video.dim() == 6:
                mask = mask[:, None].expand(-1, video.shape[1], -1)
        else:
            video = batch["video"].to(self.device, non_blocking=True)
        if video.dim() == 6:  # repeated augmentation: [B, R, T, C, H, W] -> [B*R, T, C, H, W]
            repeats = video.shape[1]
            video, mask = video.flatten(0, 1), mask.flatten(0, 1)
            label = label.repeat_interleave(repeats)
        if self.device_augment is not None:
            video = self.device_augment(video)
        video = self.normalizer(video)
        tcfg = self.cfg.trainer
        if self.mix is not None and torch.rand(()) < float(tcfg.mixup_prob):
            # Wrapped as a Video so torchvision treats [B, T, C, H, W] as a batch of clips.
            video, target = self.mix(tv_tensors.Video(video), label)
            video = video.as_subclass(torch.Tensor)
            mask = mask & mask.roll(1, 0)  # v2 MixUp/CutMix mix each clip with the previous one
        else:
            target = F.one_hot(label, self.num_classes).float()
        smoothing = float(tcfg.label_smoothing)
        if smoothing > 0:
            target = target * (1.0 - smoothing) + smoothing / self.num_classes
        return video, mask, target

    def _log_train(self, window: dict[str, Any], bar: tqdm) -> None:
        steps = max(1, window["steps"])
        # Every rank skips the same steps (the decision is all-reduced), so they agree on `trained`.
        trained = window["steps"] - window["skipped"]
        loss_sum = distributed.all_reduce_sum(window["loss"].clone())
        loss = float(loss_sum) / (trained * self.dist.world_size) if trained > 0 else None
        clips_per_s = steps * self.global_batch / max(window["time"], 1e-9)
        wait_share = window["wait"] / max(window["time"], 1e-9)
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "split": "train",
            "loss": loss,  # null when every step of the window was skipped
            "lr": lr,
            "clips_per_s": clips_per_s,
            "data_wait": wait_share,
            "num_replaced": self.num_replaced,
        }
        if window["skipped"]:
            record["skipped_steps"] = window["skipped"]
        self.logger.log(record)
        if self.dist.is_main:
            log.info(
                "epoch %d step %d | train loss %s lr %.2e | %.1f clips/s, data wait %.0f%%",
                self.epoch,
                self.step,
                "skipped" if loss is None else f"{loss:.4f}",
                lr,
                clips_per_s,
                100 * wait_share,
            )
        bar.set_postfix(
            loss="skipped" if loss is None else f"{loss:.4f}",
            lr=f"{lr:.2e}",
            clips_s=f"{clips_per_s:.1f}",
            wait=f"{100 * wait_share:.0f}%",
        )
        # After the first window (worker start-up), say once if the GPU/CPU is starved of data.
        if (
            self.step > int(self.cfg.trainer.log_every)
            and wait_share > DATA_BOUND_SHARE
            and not self._data_bound_reported
        ):
            self._data_bound_reported = True
            if self.dist.is_main:
                log.warning(
                    "data loading is the bottleneck: %.0f%% of step time is spent waiting for data "
                    "(%.1f clips/s with %d workers per rank). Raise trainer.num_workers, decode smaller "
                    "videos (scripts/prepare_k400.py, re-encode SSv2 with scripts/prepare_ssv2.py), or use "
                    "dataset.repeated_aug to reuse decoded clips.",
                    100 * wait_share,
                    clips_per_s,
                    self.num_workers,
                )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Clip-level validation (1 clip x 1 crop): a training signal, not the multi-view test number."""
        tcfg = self.cfg.trainer
        model = self.ema.module if (self.ema is not None and tcfg.ema.eval) else self.model
        batch_size = int(tcfg.val_batch_size or tcfg.batch_size)
        settings = BatchSettings(self.device, self.normalizer, batch_size, self.num_workers, self.precision)
        result = evaluate(model, self.val_set, settings, dist_info=self.dist)
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "split": "val_clip",
            "loss": result.loss,
            "top1": result.top1,
            "top5": result.top5,
            "topk": result.topk,
            "mean_class_acc": result.mean_class_acc,
            "num_videos": result.num_videos,
            "num_failed": result.num_failed,
            "weights": "ema" if model is not self.model else "model",
        }
        self.logger.log(record)
        self.last_val_step, self.last_val_top1 = self.step, result.top1
        if self.dist.is_main:
            log.info(
                "epoch %d step %d | clip-level val top1 %.2f %s %.2f (%d videos, %d failed)",
                self.epoch,
                self.step,
                result.top1,
                top5_name(result.topk),
                result.top5,
                result.num_videos,
                result.num_failed,
            )
        if not math.isfinite(result.loss):
            # NaN logits still give an argmax, hence a top-1: such a model must never become best.pt.
            if self.dist.is_main:
                log.warning(
                    "epoch %d step %d: the validation loss is %s: not a candidate for best.pt",
                    self.epoch,
                    self.step,
                    result.loss,
                )
        elif result.top1 > self.best_top1:
            self.best_top1, self.best_epoch = result.top1, self.epoch
            self.save("best.pt")
        self.logger.summary({"best_val_clip_top1": self.best_top1})
        return record


def describe_params(model: nn.Module) -> str:
    """ "5.7M params" or, when some are frozen (`backbone.freeze=true`), "0.6M of 5.7M params trainable"."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == total:
        return f"{total / 1e6:.1f}M params, all trainable"
    return f"{trainable / 1e6:.1f}M of {total / 1e6:.1f}M params trainable"


def _short_path(path: Path) -> str:
    """`path` relative to the current folder when it lies below it (a command to copy), else as is."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train with `cfg` into `run_dir` (resuming from its last checkpoint if there is one)."""
    trainer = Trainer(cfg, run_dir)
    try:
        return trainer.fit()
    finally:
        distributed.shutdown()
