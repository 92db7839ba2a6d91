"""The trainer: builds a run's parts and wires them to the loop. `train(cfg, run_dir)` runs it.

`Trainer(cfg, run_dir)` builds, in this order: the run (device, precision, seeds), the data, the
model, the optimiser and lr schedule (training/optim.py, training/schedule.py), the loop counters
(`TrainState`, training/state.py), and resumes from a checkpoint when there is one
(training/resume.py). `Trainer.fit` is the loop (training/loop.py). Everything needed to continue
exactly where it stopped is in `state_dict()`.
"""

from __future__ import annotations

import logging
import random
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from squarefuse.checkpoint import save_checkpoint
from squarefuse.datasets import build_dataset, build_device_augment, build_gpu_decoder
from squarefuse.datasets.build import check_run_dir
from squarefuse.datasets.preprocess import input_normalizer
from squarefuse.models import build_classifier
from squarefuse.models.complexity import format_model_info, model_complexity, write_model_info
from squarefuse.runtime import distributed
from squarefuse.runtime.atomic_file import check_writable, remove_stale_temp_files
from squarefuse.runtime.launch_env import env_dist_info
from squarefuse.runtime.precision import resolve_precision
from squarefuse.runtime.workers import (
    ignore_stop_signals,
    private_generator,
    resolve_cpu_threads,
    resolve_num_workers,
    shutdown_workers,
)
from squarefuse.training import resume
from squarefuse.training.config_checks import check_train_config, check_trainer_cfg, run_config
from squarefuse.training.init_from import apply_init_from, backbone_cfg_for_run, check_init_file
from squarefuse.training.loop import TrainLoop
from squarefuse.training.metrics_log import MetricsLogger
from squarefuse.training.optim import build_optimizer, scaled_lr
from squarefuse.training.resume_checks import training_list
from squarefuse.training.run_lock import RunLock
from squarefuse.training.sample_order import ResumableSampler, SeededDataset
from squarefuse.training.schedule import build_scheduler, schedule_spec
from squarefuse.training.state import TrainState, rng_state, set_rng_state

__all__ = [
    "Trainer",
    "check_train_config",
    "check_trainer_cfg",
    "describe_params",
    "describe_recipe",
    "run_config",
    "train",
]

log = logging.getLogger("squarefuse")


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


def describe_params(model: nn.Module) -> str:
    """ "5.7M params" or, when some are frozen (`backbone.freeze=true`), "0.6M of 5.7M params trainable"."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == total:
        return f"{total / 1e6:.1f}M params, all trainable"
    return f"{trainable / 1e6:.1f}M of {total / 1e6:.1f}M params trainable"


class Trainer(TrainLoop):
    """Owns the model, data, optimiser and loop state of one training run; `fit` (TrainLoop) trains."""

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
        # The run's config: `cfg` completed with what the data decides (a token cache's layout), made
        # once here; the model, config.yaml, the checkpoints and resume checks all read this one.
        self.cfg = cfg = run_config(cfg)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._build_run()
        self._build_data()
        # Weights from a file (trainer.init_from, or a resumed checkpoint) need no pretrained backbone.
        resume_from, state, why = resume.resume_source(cfg, self.ckpt_dir, is_main=self.dist.is_main)
        self._build_model(resume_from)
        self._build_optimisation()
        self.state = TrainState()  # all of it is in the checkpoint
        self._start_session()
        if resume_from is not None:
            resume.check_resumed_config(cfg, resume_from, state["config"], is_main=self.dist.is_main)
            self.load_state_dict(state, path=resume_from)
            del state
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d): %s",
                resume_from,
                self.state.step,
                self.state.epoch,
                self.state.batch_in_epoch,
                why,
            )
        self.logger = MetricsLogger(
            self.run_dir,
            cfg,
            enabled=self.dist.is_main,
            resume=resume_from is not None,
            resume_step=self.state.step if resume_from is not None else None,
            resume_val_step=self.state.last_val_step,
        )
        if self.dist.is_main:
            self._log_start()

    # ----------------------------------------------------------------------------------- setup

    def _build_run(self) -> None:
        """The config checks, the device, precision and threads, the run folder, and the seeds."""
        cfg, tcfg = self.cfg, self.cfg.trainer
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
        if self.dist.is_main:
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

    def _build_data(self) -> None:
        """The datasets, the resumable sample order and the loader. Only rank 0 writes reports; the
        others wait so that one process generates data."""
        cfg, tcfg, is_main = self.cfg, self.cfg.trainer, self.dist.is_main
        report_dir = self.run_dir if is_main else None
        if is_main:
            self.train_set = build_dataset(cfg.dataset, "train", report_dir=report_dir)
        distributed.barrier()
        if not is_main:
            self.train_set = build_dataset(cfg.dataset, "train", report_dir=None)
        all_views = tcfg.get("val_views", "first") == "all"  # else clip-level (checkpoints of older code lack the key)
        self.val_set = None
        if tcfg.val_every:
            self.val_set = build_dataset(cfg.dataset, "val", views=all_views, report_dir=report_dir)
        self.num_classes = self.train_set.num_classes
        self.training_list = training_list(self.train_set.records)  # compared on resume
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

    def _build_model(self, resume_from: Path | None) -> None:
        """Model, EMA (after .to(device), before DDP), compile. init_from (fine-tuning): weights
        only, loaded before EMA copies them; a resumed run ignores it."""
        cfg, tcfg = self.cfg, self.cfg.trainer
        backbone_cfg = backbone_cfg_for_run(cfg.backbone, tcfg.init_from, resume_from=resume_from)
        self.model = build_classifier(backbone_cfg, cfg.fusion, cfg.head, self.num_classes).to(self.device)
        apply_init_from(
            self.model,
            tcfg.init_from,
            allow_mismatch=bool(tcfg.init_allow_mismatch),
            resume_from=resume_from,
            report_dir=self.run_dir if self.dist.is_main else None,
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

    def _build_optimisation(self) -> None:
        """The optimiser (optim=...), the lr schedule (schedule=...), the loss scaler and MixUp/CutMix."""
        cfg, tcfg = self.cfg, self.cfg.trainer
        self.global_batch = self.micro_batch * self.accum * self.dist.world_size
        self.lr = scaled_lr(cfg.optim, self.global_batch)
        self.total_steps = int(tcfg.epochs) * self.steps_per_epoch
        if tcfg.max_steps is not None:
            self.total_steps = min(self.total_steps, int(tcfg.max_steps))
        self.optimizer = build_optimizer(self.model, cfg.optim, self.lr, self.device)
        self.schedule_spec = schedule_spec(
            cfg.schedule, lr=self.lr, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch
        )
        self.scheduler = build_scheduler(self.optimizer, self.schedule_spec)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        choices = []
        if float(tcfg.mixup) > 0:
            choices.append(v2.MixUp(alpha=float(tcfg.mixup), num_classes=self.num_classes))
        if float(tcfg.cutmix) > 0:
            choices.append(v2.CutMix(alpha=float(tcfg.cutmix), num_classes=self.num_classes))
        self.mix = v2.RandomChoice(choices) if choices else None

    def _log_start(self) -> None:
        """The run's start-up line (data, model, batch, lr, steps, device) and its model_info.json."""
        log.info(
            "run dir %s | %d train / %s val videos, %d classes | %s | global batch %d, lr %.2e | %s, %s schedule | "
            "%d steps (%d per epoch) | %s (%d threads), %s, %d workers/rank, world size %d",
            self.run_dir,
            len(self.train_set),
            len(self.val_set) if self.val_set else 0,
            self.num_classes,
            describe_params(self.model),
            self.global_batch,
            max(self.scheduler.base_values),  # the peak lr of the schedule in use (a resumed one's too)
            self.cfg.optim.name,
            self.schedule_spec["kind"],
            self.total_steps,
            self.steps_per_epoch,
            self.device,
            torch.get_num_threads(),
            self.precision,
            self.num_workers,
            self.dist.world_size,
        )
        model_info = model_complexity(self.model, int(self.cfg.dataset.num_frames), self.model.backbone.img_size)
        write_model_info(model_info, self.run_dir / "model_info.json")
        log.info(format_model_info(model_info))

    # ------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        rng = distributed.all_gather_objects(rng_state())
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": resume.schedule_checkpoint(self.scheduler, self.schedule_spec),
            "scaler": self.scaler.state_dict(),
            **self.state.state_dict(),  # the loop counters, each under its own name
            "world_size": self.dist.world_size,
            "rng": rng,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "class_names": self.class_names,
            "training_list": self.training_list,
        }

    def load_state_dict(self, state: dict[str, Any], *, path: str | Path = "the checkpoint") -> None:
        resume.check_world_size(state, self.dist.world_size, self.micro_batch * self.accum, path)
        resume.check_classes(self.cfg, state, self.class_names, path)
        resume.check_training_list(self.cfg, state, self.training_list, path)
        resume.load_model_weights(self.model, self.cfg, state, path)
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState.from_state_dict(state)
        resume.restore_schedule(
            self.scheduler,
            self.schedule_spec,
            state["scheduler"],
            step=self.state.step,
            path=path,
            is_main=self.dist.is_main,
        )
        set_rng_state(state["rng"][self.dist.rank])

    def save(self, name: str) -> None:
        state = self.state_dict()  # a collective (RNG gather): every rank calls it
        if self.dist.is_main:
            save_checkpoint(state, self.ckpt_dir / name)
        distributed.barrier()

    def close(self) -> None:
        """Stop the loader's workers and release the run folder (`fit` does both when it ends)."""
        # Workers ignore SIGTERM: stop them here, or an error would leave the process waiting for
        # them in multiprocessing's exit handler forever (see runtime/workers.py).
        if hasattr(self, "loader"):  # not yet when __init__ fails early
            shutdown_workers(self.loader)
        if self.run_lock is not None:
            self.run_lock.release()


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train with `cfg` into `run_dir` (resuming from its last checkpoint if there is one)."""
    trainer = Trainer(cfg, run_dir)
    try:
        return trainer.fit()
    finally:
        distributed.shutdown()
