"""Start a training run from another model's weights (`trainer.init_from=PATH`): fine-tuning.

Unlike resuming, only the weights are taken: the optimiser, schedule, step and RNG start fresh.
Every key of the model is either loaded from the file or keeps its fresh initialisation:

loaded         same name and shape in the file
reinitialised  same name, other shape: allowed in the head (another number of classes); anywhere
               else an error naming the key unless `allow_mismatch` (then kept fresh too)
missing        not in the file (e.g. a fusion layer the source model did not have); a backbone key
               missing is an error unless `allow_mismatch`: the backbone is built without its
               pretrained weights (the file replaces them), so it would stay random
unexpected     in the file but not in the model (ignored)

The file is a squarefuse checkpoint (EMA weights when it has them, as eval uses) or a plain state
dict of a `VideoClassifier` (``.pt``/``.pth``, optionally under a ``model``/``state_dict`` key, or
``.safetensors``). Image-model weights for the backbone alone go to `backbone.pretrained_path`.
The file gets the checks of eval's ``ckpt=`` (empty, truncated, not a zip archive) before it is read,
and non-float tensors for float weights (int8, bool: a quantised or damaged file) are refused, not cast.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from omegaconf import OmegaConf
from torch import nn

from squarefuse.checkpoint import check_checkpoint_file, load_weights_only, verify_checkpoint

log = logging.getLogger("squarefuse")

__all__ = [
    "InitReport",
    "apply_init_from",
    "backbone_cfg_for_run",
    "check_init_file",
    "init_from",
    "read_init_weights",
    "write_init_report",
]

# Keys under this prefix may change shape (a new class count): they are re-initialised.
HEAD_PREFIX = "head."
BACKBONE_PREFIX = "backbone."
# Prefixes of wrapped models (DDP, torch.compile) that a plain state dict may carry.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torch.save writes a zip archive (since PyTorch 1.6); a safetensors file starts with the length of
# its JSON header (8 bytes, little-endian), then the header's "{". safetensors refuses longer headers.
_ZIP_MAGIC = b"PK\x03\x04"
_SAFETENSORS_MAX_HEADER = 100_000_000


@dataclass
class InitReport:
    """What `init_from` did with each key of the model and of the file."""

    source: str
    weights: str  # "ema", "model" or "state_dict"
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[dict[str, Any]] = field(default_factory=list)  # key, file shape, model shape
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One log line: counts per top-level part, then every key not loaded."""
        by_part = Counter(key.split(".", 1)[0] for key in self.loaded)
        parts = ", ".join(f"{part} {n}" for part, n in by_part.items())
        reinit = [f"{r['key']} {tuple(r['file_shape'])} -> {tuple(r['model_shape'])}" for r in self.reinitialised]
        return (
            f"init_from {self.source} ({self.weights} weights): loaded {len(self.loaded)} keys ({parts}); "
            f"re-initialised (shape mismatch) {len(reinit)}: {reinit}; missing (kept fresh) {len(self.missing)}: "
            f"{self.missing}; unexpected (ignored) {len(self.unexpected)}: {self.unexpected}"
        )


def _strip_wrapper_prefixes(weights: Mapping[str, Any]) -> dict[str, Any]:
    weights = dict(weights)
    for prefix in _WRAPPER_PREFIXES:
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix) :]: v for k, v in weights.items()}
    return weights


def _safetensors_header_size(head: bytes) -> int | None:
    """The header length a file starting with `head` (9 bytes) declares, if it starts like safetensors."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    size = struct.unpack("<Q", head[:8])[0]
    return size if 0 < size <= _SAFETENSORS_MAX_HEADER else None


def _check_safetensors_file(path: Path, header_size: int) -> None:
    """Whole-file checks safetensors reports without the file's name ("incomplete metadata")."""
    name = f"trainer.init_from={str(path)!r}"
    size = path.stat().st_size
    if size < 8 + header_size:
        raise ValueError(
            f"{name} is a truncated safetensors file ({size} bytes, shorter than its own {header_size}-byte "
            f"header): an interrupted copy or a full disk?"
        )
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(header_size)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"{name}: damaged safetensors file (its header does not parse: {e})") from e
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        raise ValueError(
            f"{name} is a truncated safetensors file ({size} bytes, its header describes {expected}): an "
            f"interrupted copy or a full disk?"
        )


def check_init_file(path: str | Path) -> str:
    """Which reader a `trainer.init_from` file needs, "torch" or "safetensors", after cheap checks.

    The checks of eval's ``ckpt=`` (`check_checkpoint_file`: empty, truncated zip archive), and a
    safetensors file's length against its header, so that a wrong or damaged file fails here with
    its name and the problem rather than deep in unpickling (``KeyError: 101`` for a text file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty, truncated, or neither a PyTorch checkpoint nor a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trainer.init_from={str(path)!r}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    header_size = _safetensors_header_size(head)
    if header_size is not None:
        _check_safetensors_file(path, header_size)
        return "safetensors"
    if head and not head.startswith(_ZIP_MAGIC):
        raise ValueError(
            f"trainer.init_from={str(path)!r} is not a PyTorch checkpoint or safetensors file "
            f"({path.stat().st_size} bytes, neither the zip archive torch.save writes nor a safetensors header): "
            f"pass a checkpoint or state dict (.pt/.pth) or a .safetensors file"
        )
    try:
        check_checkpoint_file(path)
    except ValueError as e:  # its message names the file; say which setting gave it
        raise ValueError(f"trainer.init_from: {e}") from None
    return "torch"


def read_init_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in `path` and which weights they are ("ema", "model" or "state_dict").

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is damaged or not a state dict (or holds pickled objects), named with the path.
    """
    path = Path(path)
    if check_init_file(path) == "safetensors":
        try:
            return _strip_wrapper_prefixes(safetensors.torch.load_file(str(path))), "state_dict"
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every problem
            raise ValueError(f"trainer.init_from={str(path)!r}: cannot read the safetensors file ({e})") from e
    verify_checkpoint(path, require_zip=False)  # a flipped bit in a member: ValueError naming it
    state = load_weights_only(path, named=f"trainer.init_from={str(path)!r}")
    if not isinstance(state, Mapping):
        raise ValueError(f"trainer.init_from={str(path)!r}: expected a state dict, got {type(state).__name__}")
    if isinstance(state.get("ema"), Mapping):  # a squarefuse checkpoint with EMA weights
        weights, name = state["ema"], "ema"
    elif isinstance(state.get("model"), Mapping):  # a squarefuse checkpoint, or MAE/VideoMAE style
        weights, name = state["model"], "model"
    elif isinstance(state.get("state_dict"), Mapping):  # MMAction2 / Lightning style
        weights, name = state["state_dict"], "state_dict"
    else:
        weights, name = state, "state_dict"
    weights = _strip_wrapper_prefixes(weights)
    bad = next((k for k, v in weights.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"trainer.init_from={str(path)!r}: entry {bad!r} is not a tensor; expected a state dict")
    return weights, name


def init_from(model: nn.Module, path: str | Path, *, allow_mismatch: bool = False) -> InitReport:
    """Loads the weights in `path` that fit `model`; the rest keeps its fresh initialisation.

    Args:
        model: the freshly built classifier (before EMA copies and DDP wrap it).
        path: a squarefuse checkpoint or a state dict file.
        allow_mismatch: re-initialise shape mismatches outside the head instead of raising.

    Returns:
        The report of loaded / re-initialised / missing / unexpected keys.

    Raises:
        ValueError: a shape mismatch outside the head or a backbone key missing from the file
            (without `allow_mismatch`), naming the key; a non-float tensor for a float weight; or no
            key of the file fits the model at all.
    """
    weights, name = read_init_weights(path)
    report = InitReport(source=str(path), weights=name)
    own = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        if key not in weights:
            report.missing.append(key)
            continue
        value = weights[key]
        if value.shape == target.shape:
            to_load[key] = value
            report.loaded.append(key)
            continue
        if not key.startswith(HEAD_PREFIX) and not allow_mismatch:
            raise ValueError(
                f"trainer.init_from={str(path)!r}: {key} has shape {tuple(value.shape)} in the file but "
                f"{tuple(target.shape)} in the model (a different backbone, img_size or fusion?); set "
                f"trainer.init_allow_mismatch=true to re-initialise it"
            )
        report.reinitialised.append({"key": key, "file_shape": list(value.shape), "model_shape": list(target.shape)})
    # load_state_dict would cast int8 or bool to float without a word (a first loss in the thousands).
    not_float = [
        key for key, value in to_load.items() if own[key].is_floating_point() and not value.is_floating_point()
    ]
    if not_float:
        key = not_float[0]
        raise ValueError(
            f"trainer.init_from={str(path)!r}: {key} is {to_load[key].dtype} in the file, but the model's weights "
            f"are {own[key].dtype} ({len(not_float)} such keys): a quantised or damaged file? Non-float weights are "
            f"refused, not cast"
        )
    report.unexpected = [key for key in weights if key not in own]
    missing_backbone = [key for key in report.missing if key.startswith(BACKBONE_PREFIX)]
    if missing_backbone and report.loaded and not allow_mismatch:
        raise ValueError(
            f"trainer.init_from={str(path)!r} has no weights for {len(missing_backbone)} backbone keys (e.g. "
            f"{missing_backbone[0]}), which would stay randomly initialised; set trainer.init_allow_mismatch=true "
            f"to accept that"
        )
    if not report.loaded:
        raise ValueError(
            f"trainer.init_from={str(path)!r}: none of its {len(weights)} keys fits the model (e.g. "
            f"{next(iter(weights), None)!r}); image-model weights for the backbone go to backbone.pretrained_path"
        )
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return report


def write_init_report(report: InitReport, path: str | Path) -> None:
    """Writes the full report (every key) as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(asdict(report), indent=2) + "\n")


def backbone_cfg_for_run(backbone_cfg: Any, path: str | Path | None, *, resume_from: str | Path | None) -> Any:
    """The backbone config to build the run's model with.

    When a file replaces the weights (`trainer.init_from`, or the checkpoint a run resumes from),
    the backbone is built without its pretrained weights: loading them (from the hub, or
    `backbone.pretrained_path`) would be wasted, and fail on a machine without network access.
    """
    if path is None and resume_from is None:
        return backbone_cfg
    return OmegaConf.merge(backbone_cfg, {"pretrained": False, "pretrained_path": None})


def apply_init_from(
    model: nn.Module,
    path: str | Path | None,
    *,
    allow_mismatch: bool,
    resume_from: str | Path | None,
    report_dir: str | Path | None,
) -> InitReport | None:
    """The trainer's `trainer.init_from` step: only for a fresh run, logged and reported by rank 0.

    Args:
        model: the freshly built classifier.
        path: `trainer.init_from` (None: nothing to do).
        allow_mismatch: `trainer.init_allow_mismatch`.
        resume_from: the checkpoint the run resumes from, if any: it wins (its weights are the
            fine-tuned ones), so a restarted fine-tuning run continues instead of starting over.
        report_dir: where rank 0 writes ``init_from.json`` and logs; None on the other ranks.
    """
    if path is None:
        return None
    if resume_from is not None:
        if report_dir is not None:
            log.info("trainer.init_from=%s ignored: the run resumes from %s", path, resume_from)
        return None
    report = init_from(model, path, allow_mismatch=allow_mismatch)
    if report_dir is not None:
        log.info(report.summary())
        write_init_report(report, Path(report_dir) / "init_from.json")
    return report
