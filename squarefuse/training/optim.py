"""AdamW with layer-wise lr decay and a per-step warmup + cosine schedule, both from timm.

timm's `param_groups_layer_decay` puts an `lr_scale` into each group; only timm's schedulers
apply it (they multiply the scheduled lr by it), which is why the scheduler is timm's too.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn


def check_optim_cfg(optim_cfg: DictConfig) -> None:
    """Reject values timm's scheduler would take without a word (a negative warmup); messages name the key."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ValueError(f"optim.{key} must be {what}, got {optim_cfg[key]!r}")

    need(float(optim_cfg.warmup_epochs) >= 0, "warmup_epochs", ">= 0")
    need(float(optim_cfg.lr) >= 0, "lr", ">= 0")
    need(int(optim_cfg.lr_batch_ref) >= 1, "lr_batch_ref", ">= 1")
    need(float(optim_cfg.warmup_lr) >= 0, "warmup_lr", ">= 0")
    need(float(optim_cfg.min_lr) >= 0, "min_lr", ">= 0")
    need(float(optim_cfg.weight_decay) >= 0, "weight_decay", ">= 0")


def scaled_lr(optim_cfg: DictConfig, global_batch: int) -> float:
    """The linear scaling rule: lr x global batch / reference batch."""
    return float(optim_cfg.lr) * global_batch / float(optim_cfg.lr_batch_ref)


def build_optimizer(model: nn.Module, optim_cfg: DictConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, position embeddings, class tokens and scalars."""
    if optim_cfg.name != "adamw":
        raise ValueError(f"optim.name must be adamw, got {optim_cfg.name!r}")
    if not 0.0 < float(optim_cfg.layer_decay) <= 1.0:
        raise ValueError(f"optim.layer_decay must be in (0, 1], got {optim_cfg.layer_decay}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if float(optim_cfg.layer_decay) < 1.0:
        groups = param_groups_layer_decay(
            model,
            weight_decay=float(optim_cfg.weight_decay),
            no_weight_decay_list=skip,
            layer_decay=float(optim_cfg.layer_decay),
        )
    else:
        groups = param_groups_weight_decay(model, weight_decay=float(optim_cfg.weight_decay), no_weight_decay_list=skip)
    fused = optim_cfg.fused
    if fused == "auto":
        fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=lr, betas=tuple(optim_cfg.betas), eps=float(optim_cfg.eps), fused=bool(fused) or None
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: DictConfig, total_steps: int, warmup_steps: int
) -> CosineLRScheduler:
    """Warmup then cosine to `min_lr`, stepped per optimiser update (`step_update`)."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        lr_min=float(optim_cfg.min_lr),
        warmup_t=warmup_steps,
        warmup_lr_init=float(optim_cfg.warmup_lr),
        warmup_prefix=True,
        t_in_epochs=False,
    )
