"""Checkpoint files: written atomically, read with `weights_only=True` only.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (the config is stored
with `OmegaConf.to_container`), so the safe unpickler can read every file we write and refuses
anything else.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` so that a crash mid-write leaves the previous file intact.

    The data goes to a temporary file in the same folder, is fsync'ed, then renamed over `path`
    (an atomic rename on POSIX filesystems).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with the safe unpickler; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it contains objects other than tensors and plain containers "
            f"(torch.load(weights_only=True) failed: {str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a squarefuse checkpoint (no 'model' entry)")
    return state
