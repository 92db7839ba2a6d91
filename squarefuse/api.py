"""Use a trained checkpoint: load it with its eval preprocessing and run it on video files.

    import squarefuse
    model = squarefuse.load_model("runs/<run>/checkpoints/best.pt")
    print(squarefuse.predict(model, "clip.mp4"))  # [("pushing left to right", 0.93), ...]

`load_model` rebuilds the classifier as `eval.py` does (`select_weights`,
`build_model_from_checkpoint`), and `EvalPreprocess` (`squarefuse.datasets.preprocess`) reads a
file through the same eval item of `VideoDataset` that eval reads a split's videos with (same
sampler, decoder, views and normalisation, from the checkpoint's dataset config): a prediction
here is eval's prediction for that video and those views.

The apps (`scripts/predict.py`, `scripts/extract.py`) run many files (`datasets.inputs.find_videos`)
through `inference_loop.run_batches`, the batch loop of eval, over `EvalPreprocess.dataset(paths)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from squarefuse.checkpoint import build_model_from_checkpoint, load_checkpoint, select_weights
from squarefuse.config.dataset_overrides import merge_dataset_overrides
from squarefuse.datasets.preprocess import EvalPreprocess
from squarefuse.models import CachedTokens
from squarefuse.runtime.distributed import resolve_device
from squarefuse.runtime.launch_env import DistInfo
from squarefuse.runtime.precision import autocast, resolve_precision

__all__ = ["LoadedModel", "load_model", "predict", "predict_probs"]


@dataclass
class LoadedModel:
    """What `load_model` returns.

    Attributes:
        model: the `VideoClassifier`, in eval mode, on `preprocess.device`.
        class_names: class id -> name.
        preprocess: the checkpoint's eval preprocessing (file -> normalised views).
        weights: "ema" or "model", which weights were loaded.
        checkpoint: the checkpoint's path.
        info: step, epoch and the stored config of the checkpoint.
    """

    model: nn.Module
    class_names: list[str]
    preprocess: EvalPreprocess
    weights: str
    checkpoint: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.preprocess.device


def load_model(
    ckpt: str | Path,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    *,
    dataset: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Rebuild a trained model from its checkpoint, with its class names and eval preprocessing.

    Args:
        ckpt: a checkpoint written by the trainer (`runs/<run>/checkpoints/best.pt`).
        use_ema: load the EMA weights when the checkpoint has them.
        device: "cpu", "cuda", "cuda:N" or "auto".
        dataset: overrides of the stored dataset config, as in `eval.py` (`decoder`,
            `test_clips`...); null values keep the stored value.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: the file is not a squarefuse trainer checkpoint, the model was trained on a
            token cache (it takes cached tokens, not videos), or an override names a key the stored
            dataset config lacks.
    """
    state = load_checkpoint(ckpt)
    for key in ("config", "class_names"):
        if key not in state:
            raise ValueError(f"{ckpt} has no '{key}' entry: it was not written by the squarefuse trainer")
    device = resolve_device(str(device), DistInfo())
    weights, weights_name = select_weights(state, use_ema)
    model = build_model_from_checkpoint(state, weights).to(device).eval()
    if isinstance(model.backbone, CachedTokens):
        raise ValueError(_token_model_message(ckpt, state["config"], model.backbone))
    class_names = list(state["class_names"])
    dataset_cfg = merge_dataset_overrides(state["config"]["dataset"], dataset)
    preprocess = EvalPreprocess(dataset_cfg, class_names=class_names, mean=model.mean, std=model.std, device=device)
    info = {"step": state.get("step"), "epoch": state.get("epoch"), "config": state["config"]}
    return LoadedModel(model, class_names, preprocess, weights_name, str(ckpt), info)


def _token_model_message(ckpt: str | Path, config: Mapping[str, Any], backbone: CachedTokens) -> str:
    """Why a model trained on a token cache cannot take videos, and what it takes instead."""
    root = (config.get("dataset") or {}).get("root")
    n, d = backbone.token_shape
    return (
        f"{ckpt} was trained on cached tokens (the output of the frozen backbone {backbone.name} that "
        f"scripts/cache_tokens.py stored in the token cache {root}), not on videos: it has no backbone and takes "
        f"those tokens, [frames, {n}, {d}] per view, not video files (which scripts/predict.py, extract.py, "
        f"export.py and cache_tokens.py give a model). Evaluate it on its cache (python eval.py ckpt={ckpt}), "
        "or train the same fusion on the videos with the backbone frozen for a model that takes videos."
    )


def predict_probs(
    model: LoadedModel, path: str | Path, *, views: str | Sequence[int] | None = None, precision: str = "auto"
) -> Tensor:
    """Class probabilities [C] of one video: softmax per view, averaged over the views (as eval).

    Args:
        model: what `load_model` returned.
        path: the video file.
        views: (clips, crops) or "CxK"; None = the checkpoint's eval views.
        precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32.
    """
    preprocess = model.preprocess if views is None else model.preprocess.with_views(views)
    video, mask = preprocess(path)
    with torch.inference_mode(), autocast(model.device, resolve_precision(precision, model.device)):
        logits = model.model(video, mask)
    return logits.float().softmax(dim=-1).mean(dim=0).cpu()


def predict(
    model: LoadedModel,
    path: str | Path,
    topk: int = 5,
    views: str | Sequence[int] | None = None,
    *,
    precision: str = "auto",
) -> list[tuple[str, float]]:
    """The `topk` most likely classes of one video, as (class name, probability), best first.

    Args:
        model: what `load_model` returned.
        path: the video file.
        topk: how many classes (at most the number of classes).
        views: (clips, crops) or "CxK"; None = the checkpoint's eval views ("1x1" is fastest).
        precision: auto | bf16 | fp16 | fp32.

    Raises:
        FileNotFoundError, DecodeError: the video is missing or does not decode.
    """
    if topk < 1:
        raise ValueError(f"topk={topk}: must be >= 1")
    probs = predict_probs(model, path, views=views, precision=precision)
    top = probs.topk(min(topk, probs.numel()))
    return [(model.class_names[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
