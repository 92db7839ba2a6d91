"""The checks of a training config that need no data and no device (`check_train_config`), and the
run's config they check (`run_config`: the config completed with what the data decides).

train.py (and scripts/cache_tokens.py) run the checks before anything is created; `Trainer` makes the
run's config once and checks it again.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from squarefuse.datasets.formats import find_format
from squarefuse.models import build_classifier
from squarefuse.training.optim import check_optim_cfg
from squarefuse.training.schedule import check_schedule_cfg


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
    need(tcfg.get("patience") is None or int(tcfg.patience) >= 1, "patience", "null or >= 1")
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
    need(tcfg.get("val_views", "first") in ("first", "all"), "val_views", "first or all")
    need(0.0 < float(tcfg.ema.decay) < 1.0, "ema", "a mapping with decay in (0, 1)")


def run_config(cfg: DictConfig) -> DictConfig:
    """The config a run trains with: a copy of `cfg` completed with the values its data decides.

    The dataset's format says which (`DatasetFormat.run_settings`): none for videos; for a token
    cache (`dataset=tokens`), its frames, frame size, backbone and token layout from its cache.json,
    after checking that the ones `cfg` names match (ValueError naming both). The trainer makes it
    once per run and keeps it as the run's config (config.yaml, the checkpoints); `cfg` is left as it is.
    """
    completed = copy.deepcopy(cfg)
    with open_dict(completed):
        for key, value in find_format(cfg.dataset.name).run_settings(cfg.dataset).items():
            OmegaConf.update(completed, key, value, merge=False)
    return completed


def check_train_config(cfg: DictConfig) -> None:
    """Every check that needs no data and no device, run before anything is created.

    The trainer and optimiser keys, and the model: the backbone, fusion and head are built on the
    meta device (no memory, no weights read), so each layer's own argument checks (`fusion.K=0`,
    `fusion.quantiles=[0.1,1.5]`...) run before the data is generated or a file is written.

    The checks see the run's config (`run_config`: with `dataset=tokens`, completed from the cache's
    `cache.json`, which the model is built from); `cfg` itself is not changed.

    Raises:
        ValueError: naming the key and its value.
    """
    cfg = run_config(cfg)
    tcfg = cfg.trainer
    dataset_format = find_format(cfg.dataset.name)
    if not dataset_format.decodes_videos and (float(tcfg.mixup) > 0 or float(tcfg.cutmix) > 0):
        raise ValueError(
            f"trainer.mixup={tcfg.mixup}, trainer.cutmix={tcfg.cutmix}: MixUp/CutMix mix pixels, and a run on "
            f"dataset={dataset_format.name} has none; set both to 0"
        )
    check_trainer_cfg(tcfg)
    check_optim_cfg(cfg.optim)
    check_schedule_cfg(cfg.schedule)
    backbone_cfg = OmegaConf.merge(cfg.backbone, {"pretrained": False, "pretrained_path": None})
    with torch.device("meta"):
        model = build_classifier(backbone_cfg, cfg.fusion, cfg.head, num_classes=2)  # any class count will do
    backbone = model.backbone
    if getattr(model.head, "reads_patch_tokens", False) and backbone.num_tokens <= backbone.num_prefix_tokens:
        raise ValueError(
            f"head {type(model.head).__name__} averages the patch tokens, and the backbone's {backbone.num_tokens} "
            f"tokens per frame are its prefix tokens only ({dataset_format.describe(cfg.dataset)}): use head=cls "
            "(or head=attentive, which reads every token)"
        )
