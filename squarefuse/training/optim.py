"""The optimiser, chosen by `optim.name` (configs/optim/): AdamW or SGD, with layer-wise lr decay.

timm's `param_groups_layer_decay` puts an `lr_scale` into each group; only timm's schedulers
apply it (they multiply the scheduled lr by it), which is why the schedules are timm's too
(training/schedule.py).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

OPTIMIZERS = ("adamw", "sgd")


def check_optim_cfg(optim_cfg: DictConfig) -> None:
    """Reject values torch would take without a word (a negative lr); messages name the key."""
    if optim_cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)} (optim=...), got {optim_cfg.name!r}")

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ValueError(f"optim.{key} must be {what}, got {optim_cfg[key]!r}")

    need(float(optim_cfg.lr) >= 0, "lr", ">= 0")
    need(int(optim_cfg.lr_batch_ref) >= 1, "lr_batch_ref", ">= 1")
    need(float(optim_cfg.weight_decay) >= 0, "weight_decay", ">= 0")
    need(0.0 < float(optim_cfg.layer_decay) <= 1.0, "layer_decay", "in (0, 1]")
    need(optim_cfg.fused in ("auto", True, False), "fused", "auto, true or false")
    if optim_cfg.name == "sgd":
        need(float(optim_cfg.momentum) >= 0, "momentum", ">= 0")


def scaled_lr(optim_cfg: DictConfig, global_batch: int) -> float:
    """The linear scaling rule: lr x global batch / reference batch."""
    return float(optim_cfg.lr) * global_batch / float(optim_cfg.lr_batch_ref)


def param_groups(model: nn.Module, optim_cfg: DictConfig) -> list[dict]:
    """No weight decay on biases, norms, position embeddings, class tokens and scalars; layer decay < 1
    gives each block its own `lr_scale`."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    weight_decay = float(optim_cfg.weight_decay)
    if float(optim_cfg.layer_decay) < 1.0:
        return param_groups_layer_decay(
            model, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=float(optim_cfg.layer_decay)
        )
    return param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)


def build_optimizer(model: nn.Module, optim_cfg: DictConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW or SGD (optim.name) over `param_groups`, at the scaled lr `lr`."""
    check_optim_cfg(optim_cfg)
    groups = param_groups(model, optim_cfg)
    fused = device.type == "cuda" if optim_cfg.fused == "auto" else bool(optim_cfg.fused)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=float(optim_cfg.momentum),
            nesterov=bool(optim_cfg.nesterov),
            fused=fused or None,
        )
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), eps=float(optim_cfg.eps), fused=fused or None)
