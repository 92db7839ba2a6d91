"""Export a trained model to ONNX or TorchScript: `python scripts/export.py ckpt=PATH format=onnx`.

The exported model takes a normalised clip ``video`` float32 [B,T,C,H,W] (B dynamic; T and H=W
fixed at the checkpoint's num_frames and crop size; pixels /255 then (x - mean) / std with the
mean/std written to export.json) and returns ``logits`` [B,num_classes]. With ``mask=true`` it
also takes ``mask`` bool [B,T] (False = padded frame) for clips of short videos.

SQuaRe-Fuse's directions U are computed once at export (`SQuaReFuse.freeze_directions`): the
graph holds U as a constant, no QR (ONNX has no QR operator). The model is traced in fp32 on the
CPU (`torch.onnx.export(dynamo=False)` / `torch.jit.trace`), then checked: the exported file is
loaded back (onnxruntime for ONNX) and its logits on random clips of two batch sizes must match
PyTorch's within `atol`, else the export fails and no file is left.

What does not export: the masked path to ONNX (the fusion ranks valid frames with a cumulative
sum over a bool tensor, which onnxruntime rejects: the check reports it); full clips (mask=false)
and TorchScript with a mask do.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from squarefuse.api import load_model
from squarefuse.runtime.atomic_file import atomic_write, new_temp_file

__all__ = ["EXPORT_FORMATS", "ExportedClassifier", "check_export", "export_model", "run_export"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
ONNX_PACKAGES = ("onnx", "onnxruntime")  # pyproject.toml's `export` extra


def check_export_packages(fmt: str) -> None:
    """Fail before anything is loaded or written when `fmt` needs packages that are not installed.

    Raises:
        ImportError: naming the missing package and the extra that installs it.
    """
    if fmt != "onnx":
        return
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(
                f"format=onnx needs the packages onnx and onnxruntime, and {name} is not installed ({e}): "
                'pip install -e ".[export]" (or use format=torchscript, which needs nothing more)'
            ) from e


class ExportedClassifier(nn.Module):
    """The graph that is exported: normalised clip (and mask) -> logits.

    Args:
        model: a `VideoClassifier`; a copy is made (eval mode, fp32, CPU) whose SQuaRe-Fuse
            directions are frozen, so the caller's model is left as it was.
        mask: take a valid-frame mask [B,T] as second input.
    """

    def __init__(self, model: nn.Module, *, mask: bool = False) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).float().cpu().eval()
        for module in self.model.modules():
            if hasattr(module, "freeze_directions"):
                module.freeze_directions()
        self.mask = mask

    def forward(self, video: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.model(video, mask if self.mask else None)


def _example_inputs(batch_size: int, num_frames: int, crop_size: int, mask: bool, seed: int) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(batch_size, num_frames, 3, crop_size, crop_size, generator=generator)
    if not mask:
        return (video,)
    # Every clip keeps its first frame valid; the rest at random (some clips padded, some not).
    valid = torch.rand(batch_size, num_frames, generator=generator) > 0.3
    valid[:, 0] = True
    return video, valid


def _run_exported(path: Path, fmt: str, inputs: tuple[Tensor, ...]) -> Tensor:
    if fmt == "onnx":
        import onnxruntime  # noqa: PLC0415 - optional: only the ONNX check needs it

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        (logits,) = session.run(["logits"], {n: x.numpy() for n, x in zip(names, inputs, strict=True)})
        return torch.from_numpy(logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, once per load
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(*inputs)


def check_export(
    path: str | Path,
    fmt: str,
    wrapper: ExportedClassifier,
    *,
    num_frames: int,
    crop_size: int,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float = 1e-4,
) -> float:
    """Largest |exported - PyTorch| logit on random clips of each batch size.

    Raises:
        RuntimeError: the file does not load or run, or a difference exceeds `atol`.
    """
    worst = 0.0
    for seed, batch_size in enumerate(batch_sizes, start=1):
        inputs = _example_inputs(batch_size, num_frames, crop_size, wrapper.mask, seed)
        with torch.no_grad():
            expected = wrapper(*inputs)
        try:
            got = _run_exported(Path(path), fmt, inputs)
        except Exception as e:  # noqa: BLE001 - any runtime failure of the exported file is reported as one
            raise RuntimeError(f"the exported {fmt} model does not run: {type(e).__name__}: {e}") from e
        if got.shape != expected.shape:
            raise RuntimeError(f"the exported {fmt} model returns {tuple(got.shape)}, expected {tuple(expected.shape)}")
        worst = max(worst, (got - expected).abs().max().item())
    if not worst <= atol:
        raise RuntimeError(f"the exported {fmt} model differs from PyTorch by {worst:.3g} (> atol={atol})")
    return worst


def export_model(
    model: nn.Module,
    path: str | Path,
    *,
    fmt: str,
    num_frames: int,
    crop_size: int,
    mask: bool = False,
    opset: int = 17,
    atol: float = 1e-4,
) -> float:
    """Export `model` to `path` and check it; returns the largest logit difference measured.

    Args:
        model: a `VideoClassifier` (left unchanged).
        path: the file to write (written only once the check passed).
        fmt: "onnx" or "torchscript".
        num_frames: T of the exported clip (fixed in the graph).
        crop_size: H = W of the exported clip.
        mask: add a valid-frame mask input.
        opset: ONNX opset.
        atol: the largest logit difference accepted.

    Raises:
        ValueError: an unknown format.
        RuntimeError: the export or its check failed (the message says which op or how far off).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format={fmt!r}: choose one of {list(EXPORT_FORMATS)}")
    check_export_packages(fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportedClassifier(model, mask=mask)
    example = _example_inputs(2, num_frames, crop_size, mask, seed=0)
    names = ["video", "mask"][: len(example)]
    fd, tmp_name = new_temp_file(path)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Tracing warns about every Python-side shape check and constant; the check below is
            # what tells whether the traced graph is right.
            warnings.simplefilter("ignore")
            try:
                if fmt == "onnx":
                    torch.onnx.export(
                        wrapper,
                        example,
                        str(tmp),
                        input_names=names,
                        output_names=["logits"],
                        dynamic_axes={**{n: {0: "batch"} for n in names}, "logits": {0: "batch"}},
                        opset_version=opset,
                        dynamo=False,  # the torch.export-based exporter needs onnxscript
                    )
                else:
                    torch.jit.trace(wrapper, example).save(str(tmp))
            except Exception as e:  # noqa: BLE001 - reported with the format, the cause chained
                raise RuntimeError(f"{fmt} export failed: {type(e).__name__}: {e}") from e
        try:
            worst = check_export(tmp, fmt, wrapper, num_frames=num_frames, crop_size=crop_size, atol=atol)
        except RuntimeError as e:
            if mask and fmt == "onnx":
                raise RuntimeError(
                    f"{e}\nThe masked path does not export to ONNX (the fusion ranks the valid frames with a "
                    "cumulative sum over a bool mask): use format=torchscript, or mask=false with full clips."
                ) from e
            raise
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return worst


def run_export(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """The export app: checkpoint -> model.onnx / model.torchscript.pt + export.json in `run_dir`.

    Args:
        cfg: the composed `configs/export.yaml` (ckpt, format, use_ema, num_frames, mask, opset, atol).
        run_dir: the output folder.

    Returns:
        What export.json holds: the file, its inputs and outputs, normalisation, class names and
        the measured difference to PyTorch.
    """
    if cfg.get("ckpt") is None:
        raise ValueError("ckpt is required: python scripts/export.py ckpt=PATH format=onnx|torchscript")
    fmt = str(cfg.format)
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format={fmt!r}: choose one of {list(EXPORT_FORMATS)}")
    check_export_packages(fmt)
    loaded = load_model(str(cfg.ckpt), use_ema=bool(cfg.use_ema), device="cpu")
    num_frames = int(cfg.num_frames or loaded.preprocess.num_frames)
    crop_size = loaded.preprocess.crop_size
    mask = bool(cfg.mask)
    path = Path(run_dir) / EXPORT_FORMATS[fmt]
    worst = export_model(
        loaded.model,
        path,
        fmt=fmt,
        num_frames=num_frames,
        crop_size=crop_size,
        mask=mask,
        opset=int(cfg.opset),
        atol=float(cfg.atol),
    )
    inputs = [{"name": "video", "dtype": "float32", "shape": ["batch", num_frames, 3, crop_size, crop_size]}]
    if mask:
        inputs.append({"name": "mask", "dtype": "bool", "shape": ["batch", num_frames]})
    summary = {
        "checkpoint": str(Path(str(cfg.ckpt)).resolve()),
        "weights": loaded.weights,
        "format": fmt,
        "file": path.name,
        "inputs": inputs,
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(loaded.class_names)]}],
        "normalise": {"scale": "pixels / 255", "mean": list(loaded.model.mean), "std": list(loaded.model.std)},
        "class_names": loaded.class_names,
        "max_abs_diff": worst,
    }
    with atomic_write(Path(run_dir) / "export.json") as f:
        json.dump(summary, f, indent=1)
    log.info(f"exported {fmt} to {path} (logits within {worst:.2g} of PyTorch on random clips)")
    return summary
