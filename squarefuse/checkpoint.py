"""Checkpoint files, and the model a checkpoint holds.

Files are written atomically, verified against the CRC-32s in their zip archive when read
(`verify_checkpoint`), and read with `weights_only=True` only. A checkpoint is a plain dict
of tensors, numbers, strings, lists and dicts (the config is stored with `OmegaConf.to_container`),
so the safe unpickler can read every file we write and refuses anything else. The trainer's
checkpoints also hold "config" and "class_names", from which `build_model_from_checkpoint` rebuilds
the `VideoClassifier` without touching the hub or the pretrained file. A checkpoint may come from
anyone: an interpolation in its stored config is refused, never resolved (`literal_config`: no
resolver runs), and the model is built only from the classes of `squarefuse.models`, never from whatever
callable a ``_target_`` in the file names.
"""

from __future__ import annotations

import logging
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from squarefuse import models
from squarefuse.config.stored_config import literal_config
from squarefuse.models import build_classifier
from squarefuse.runtime.atomic_file import atomic_write

log = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` so that a crash mid-write leaves the previous file intact.

    The data goes to a temporary file in the same folder, is fsync'ed, then renamed over `path`
    (an atomic rename on POSIX filesystems). A full disk raises OSError ENOSPC naming `path` and
    saying the previous file is untouched (see `atomic_write`).
    """
    path = Path(path)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    return path


def check_checkpoint_file(path: str | Path, *, require_zip: bool = True) -> Path:
    """Cheap checks that ``path`` can be a checkpoint, before anything is created for it.

    ``torch.save`` writes a zip archive; an empty file (an interrupted copy, a full disk) or any
    other file (a text file, a log) fails here with a message that names it, not deep in unpickling.
    ``require_zip=False`` lets other files through (the legacy format of torch < 1.6, which
    ``trainer.init_from`` may be given) but still refuses an empty file or a truncated zip archive.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"checkpoint {path} is empty (0 bytes): an interrupted copy or a full disk when it was written? "
            "Use another checkpoint of the run (checkpoints/last.pt or best.pt)."
        )
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            truncated = f.read(4) == b"PK\x03\x04"  # a zip archive's start without its end
        if truncated:
            raise ValueError(
                f"checkpoint {path} is truncated ({size} bytes; an interrupted copy or a full disk?): "
                "use another checkpoint of the run (checkpoints/last.pt or best.pt)."
            )
        if require_zip:
            raise ValueError(
                f"{path} is not a PyTorch checkpoint ({size} bytes, not the zip archive torch.save writes): "
                "pass a file written by squarefuse (runs/.../checkpoints/best.pt or last.pt)."
            )
    return path


def find_damaged_member(path: Path) -> str | None:
    """The first member of the zip archive `path` whose bytes differ from the CRC-32 stored for them (None: none).

    Raises:
        Exception: the archive itself cannot be read (`zipfile.BadZipFile`, OSError...).
    """
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            # torch.save under `torch.serialization.set_crc32_options(False)` stores 0 for every
            # member: nothing to check (a real CRC-32 of 0 has a chance of 1 in 4 billion).
            if info.CRC == 0:
                continue
            try:
                with archive.open(info) as member:
                    while member.read(1 << 24):  # zipfile compares the CRC-32 at the end
                        pass
            except zipfile.BadZipFile:
                return info.filename
    return None


def verify_checkpoint(path: str | Path, *, require_zip: bool = True) -> Path:
    """Check that every byte of ``path`` is what was saved; the one integrity check of every checkpoint read.

    ``torch.load`` does not look at the CRC-32 that ``torch.save`` stores for each member of its zip
    archive: a flipped bit in a tensor loads silently as a wrong weight. Here every member is read and
    checked against its CRC (as ``zipfile.testzip`` does; reading a 1 GB file costs about a second).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty, truncated, not a checkpoint, or damaged; the message names the
            file and the damaged member (``archive/data/3`` is the storage of one tensor).
    """
    path = check_checkpoint_file(path, require_zip=require_zip)
    if not zipfile.is_zipfile(path):
        return path  # a legacy (non-zip) file that require_zip=False lets through: it has no CRCs
    try:
        bad = find_damaged_member(path)
    except Exception as e:  # noqa: BLE001 - a damaged directory raises many kinds; all mean the same
        reason = str(e).strip() or type(e).__name__
        raise ValueError(f"checkpoint {path} is damaged: its zip archive cannot be read ({reason})") from e
    if bad is not None:
        raise ValueError(
            f"checkpoint {path} is damaged: member {bad!r} does not match the CRC-32 stored when it was saved "
            "(a flipped bit on the disk, in memory or in a copy). Use another checkpoint of the run "
            "(checkpoints/last.pt or best.pt) or copy the file again from its source."
        )
    return path


def load_weights_only(path: Path, *, named: str, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` with the safe unpickler; errors begin with `named` (how the user gave the file)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{named}: refusing a file with objects other than tensors and plain containers "
            f"(torch.load(weights_only=True) failed: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # noqa: BLE001 - a damaged archive raises many kinds; all mean the same to the user
        reason = str(e).strip() or type(e).__name__
        raise ValueError(f"{named}: cannot read it, damaged or truncated file ({reason})") from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint, verified (`verify_checkpoint`), with the safe unpickler; errors name the file."""
    path = verify_checkpoint(path)
    state = load_weights_only(path, named=f"checkpoint {path}", map_location=map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a squarefuse checkpoint (no 'model' entry)")
    return state


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _run_had_ema(state: Mapping[str, Any]) -> bool:
    """Whether the run that saved `state` trained with EMA (`trainer.ema.enabled`); True when unknown."""
    ema_cfg = ((state.get("config") or {}).get("trainer") or {}).get("ema")
    return not isinstance(ema_cfg, Mapping) or bool(ema_cfg.get("enabled", True))


def select_weights(state: Mapping[str, Any], use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict to evaluate and its name ("ema" or "model").

    EMA weights when asked for and present; a wrapper's `module.` / torch.compile's `_orig_mod.`
    prefix is removed so the state dict fits the bare `VideoClassifier`.
    """
    if use_ema and state.get("ema") is not None:
        weights, name = state["ema"], "ema"
    else:
        # A run trained without EMA (the default recipes) has none by design: nothing to warn about.
        if use_ema and _run_had_ema(state):
            log.warning("use_ema=true but the checkpoint has no EMA weights: evaluating the model weights")
        weights, name = state["model"], "model"
    for prefix in ("module.", "_orig_mod."):
        weights = _strip_prefix(weights, prefix)
    return weights, name


def _model_targets(node: Any, key: str) -> list[tuple[str, Any]]:
    """Every (config key, ``_target_`` value) under `node`."""
    found = []
    if isinstance(node, Mapping):
        for name, value in node.items():
            if name == "_target_":
                found.append((f"{key}._target_", value))
            else:
                found += _model_targets(value, f"{key}.{name}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _model_targets(value, f"{key}[{i}]")
    return found


def _model_class_paths() -> set[str]:
    """Every dotted path under `squarefuse.models` that names one of its public classes (or `square_fuse`)."""
    allowed = [getattr(models, name) for name in models.__all__]
    return {
        f"{module_name}.{attr}"
        for module_name, module in list(sys.modules.items())
        if module_name == "squarefuse.models" or module_name.startswith("squarefuse.models.")
        for attr, value in vars(module).items()
        if any(value is obj for obj in allowed)
    }


def check_model_targets(config: Mapping[str, Any]) -> None:
    """Refuse a stored config whose backbone, fusion or head names anything but a `squarefuse.models` class.

    Hydra calls whatever a ``_target_`` names (``os.remove``, ``subprocess.run``...), with the
    arguments beside it: from a checkpoint's file, only the model classes the configs use may be
    built. The value is compared with the paths of those classes, nothing is imported for it.

    Raises:
        ValueError: naming the key and the value.
    """
    paths = _model_class_paths()
    for part in ("backbone", "fusion", "head"):
        for key, target in _model_targets(config.get(part), part):
            if not (isinstance(target, str) and target in paths):
                raise ValueError(
                    f"the checkpoint's config has {key}={str(target)[:200]!r}, which is not a squarefuse model class: "
                    "refusing to build it (a checkpoint's config may only name the classes of squarefuse.models). "
                    "Use a checkpoint written by the squarefuse trainer."
                )


def build_model_from_checkpoint(state: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild the `VideoClassifier` from the stored config and load `weights` (strict).

    The stored config may hold no interpolation (`literal_config`) and its ``_target_``s must be
    squarefuse model classes (`check_model_targets`).
    """
    check_model_targets(state["config"])
    backbone, fusion, head = (
        literal_config(state["config"][part], prefix=part) for part in ("backbone", "fusion", "head")
    )
    # Every weight comes from the checkpoint: never touch the hub or the pretrained file again.
    backbone = OmegaConf.merge(backbone, {"pretrained": False, "pretrained_path": None})
    model = build_classifier(backbone, fusion, head, num_classes=len(state["class_names"]))
    model.load_state_dict(weights, strict=True)
    return model
