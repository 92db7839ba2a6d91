"""Where a run is: the loop counters (`TrainState`) and the process's random states.

Both go into every checkpoint, and both come back on resume: with them (and the model, optimiser,
schedule and sample order) a resumed run continues exactly as if it had not stopped.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """The loop's counters. A field added here is saved and resumed with no other change.

    A checkpoint stores each field under its own name, at the top level (`state["step"]`). One
    saved before a field existed resumes with that field's default.
    """

    step: int = 0  # optimiser steps done (skipped ones included)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this rank done in the current epoch
    best_top1: float = -math.inf
    best_epoch: int | None = None
    last_val_top1: float | None = None
    last_val_step: int = -1
    num_replaced: int = 0  # videos that failed to decode and were replaced by another
    num_skipped: int = 0  # steps skipped for a non-finite loss (trainer.nonfinite=skip)
    consecutive_skips: int = 0
    validations_since_best: int = 0  # trainer.patience: validations in a row without a new best top-1

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainState:
        """The fields of `state` (a whole checkpoint will do: other keys are ignored)."""
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists (readable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
