"""Mixed precision: the `trainer.precision` names and the autocast context for them."""

from __future__ import annotations

import contextlib

import torch

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """`fp32` -> None (no autocast), `bf16`/`fp16` -> the autocast dtype."""
    if precision not in _DTYPES:
        raise ValueError(f"precision must be auto or one of {sorted(_DTYPES)}, got {precision!r}")
    return _DTYPES[precision]


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA, fp32 elsewhere; other names are checked."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    autocast_dtype(precision)
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)
