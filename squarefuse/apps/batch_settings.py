"""`BatchSettings` from the keys that eval, predict and extract share: batch_size, num_workers, precision."""

from __future__ import annotations

from typing import Any

import torch

from squarefuse.datasets.preprocess import VideoNormalizer
from squarefuse.evaluation.video_batches import BatchSettings
from squarefuse.runtime.precision import resolve_precision
from squarefuse.runtime.workers import resolve_num_workers


def batch_settings(cfg: Any, device: torch.device, normalizer: VideoNormalizer, **frame_order: Any) -> BatchSettings:
    """The app config's batch settings on `device`; `frame_order`: frame_order=..., frame_order_seed=..."""
    return BatchSettings(
        device=device,
        normalizer=normalizer,
        batch_size=int(cfg.batch_size),
        num_workers=resolve_num_workers(cfg.num_workers, key="num_workers"),
        precision=resolve_precision(str(cfg.precision), device),
        **frame_order,
    )
