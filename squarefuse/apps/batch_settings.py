"""`BatchSettings` from the keys that eval, predict and extract share: batch_size, num_workers, precision,
loader_timeout."""

from __future__ import annotations

import math
from typing import Any

import torch

from squarefuse.datasets.preprocess import VideoNormalizer
from squarefuse.evaluation.inference_loop import DEFAULT_LOADER_TIMEOUT_S, BatchSettings
from squarefuse.runtime.precision import resolve_precision
from squarefuse.runtime.workers import resolve_num_workers


def batch_settings(cfg: Any, device: torch.device, normalizer: VideoNormalizer, **frame_order: Any) -> BatchSettings:
    """The app config's batch settings on `device`; `frame_order`: frame_order=..., frame_order_seed=...

    Raises:
        ValueError: loader_timeout is not a number of seconds > 0 (naming it).
    """
    timeout = cfg.get("loader_timeout", DEFAULT_LOADER_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"loader_timeout={timeout!r}: must be a number of seconds > 0 (how long to wait for a batch)")
    return BatchSettings(
        device=device,
        normalizer=normalizer,
        batch_size=int(cfg.batch_size),
        num_workers=resolve_num_workers(cfg.num_workers, key="num_workers"),
        precision=resolve_precision(str(cfg.precision), device),
        loader_timeout=float(timeout),
        **frame_order,
    )
