"""Multi-view evaluation: every video once, clips x crops softmax-averaged, exact under DDP.

`evaluate` is what the trainer calls (clip-level validation with views=(1, 1), or the full
multi-view test); `run_eval` is the `eval.py` app: checkpoint -> model -> eval split -> result
files.

Exactness: the eval indices are split across ranks without padding (unlike `DistributedSampler`,
which repeats videos to even out the shards), each rank returns (index, probs, label) for the
videos it decoded and the indices of those it could not, everything is gathered to every rank and
checked to cover each index exactly once. A video that fails to decode is counted, never replaced.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_confusion_matrix
from tqdm import tqdm

from squarefuse.engine.checkpoint import load_checkpoint
from squarefuse.engine.distributed import (
    RUN_STAMP_ENV,
    DistInfo,
    all_gather_objects,
    default_num_workers,
    init_distributed,
    shutdown,
)
from squarefuse.engine.loader import ignore_stop_signals, private_generator
from squarefuse.engine.precision import autocast, resolve_precision
from squarefuse.engine.preprocess import VideoNormalizer

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Metrics over the videos that decoded, and the per-video predictions behind them.

    Accuracies are in percent. `indices`, `labels` and `probs` hold one row per evaluated video,
    sorted by dataset index; `probs` is the softmax averaged over the clips x crops views.
    """

    top1: float
    top5: float
    mean_class_acc: float
    loss: float
    num_videos: int
    num_failed: int
    views: tuple[int, int]
    indices: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor
    failed_indices: list[int] = field(default_factory=list)

    @property
    def topk(self) -> int:
        """The k of the `top5` number: min(5, number of classes)."""
        return min(5, self.probs.shape[1])


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of `range(num_items)`: every `world_size`-th index, no padding.

    Shards differ in length by at most one and together cover every index exactly once, whatever
    `num_items` is (`DistributedSampler` would instead repeat items to make them equal).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(range(rank, num_items, world_size))


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts; row = true class, column = predicted class."""
    if labels.numel() == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.long)
    return multiclass_confusion_matrix(preds, labels, num_classes=num_classes, validate_args=False).long()


def mean_class_accuracy(confmat: torch.Tensor) -> float:
    """Mean over the classes present in the eval set of their recall, in percent.

    Classes with no video are left out of the mean (as in MMAction2 / VideoMAE): torchmetrics'
    macro accuracy would count a class that has no video but is predicted as 0% instead.
    """
    support = confmat.sum(dim=1)
    present = support > 0
    if not present.any():
        return float("nan")
    recall = confmat.diagonal()[present].double() / support[present].double()
    return 100.0 * recall.mean().item()


def _compute_metrics(labels: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
    num_classes = probs.shape[1]
    k = min(5, num_classes)
    topk = probs.topk(k, dim=1).indices
    preds = topk[:, 0]
    top1 = 100.0 * (preds == labels).double().mean().item()
    top5 = 100.0 * (topk == labels[:, None]).any(dim=1).double().mean().item()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    mca = mean_class_accuracy(confusion_matrix(labels, preds, num_classes))
    return {"top1": top1, "top5": top5, "mean_class_acc": mca, "loss": loss}


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP forwards can start collectives (buffer broadcast); the shards have different lengths,
    # so ranks run different numbers of batches: evaluate the wrapped module directly.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    device: torch.device,
    normalizer: VideoNormalizer,
    batch_size: int,
    num_workers: int,
    precision: str,
    dist_info: DistInfo,
    views: tuple[int, int] = (1, 1),
    progress: bool = False,
) -> EvalResult:
    """Evaluate `model` on an eval-split dataset; every rank returns the same, full result.

    Args:
        model: a `VideoClassifier` (or DDP around one) already on `device`.
        dataset: eval split from `build_dataset(..., views=...)`; items hold video uint8
            [V,T,C,H,W], mask bool [V,T], label, index and failed.
        device: where the forward runs.
        normalizer: uint8 -> normalised float, on `device`.
        batch_size: videos per batch (each brings V = clips x crops clips).
        num_workers: DataLoader workers of this rank.
        precision: fp32 | bf16 | fp16 (autocast).
        dist_info: this process's rank and world size; with world_size > 1 the process group must
            be initialised (results are gathered with `all_gather_objects`).
        views: (clips, crops) the dataset was built with; checked against V, and reported.
        progress: show a progress bar on rank 0.

    Returns:
        An `EvalResult` with metrics over the videos that decoded and the failed indices.

    Raises:
        ValueError: the dataset's V is not clips x crops, the model's outputs do not match the
            dataset's classes, or no video at all could be decoded.
    """
    part = predict_shard(
        model,
        dataset,
        shard=shard_indices(len(dataset), dist_info.rank, dist_info.world_size),
        device=device,
        normalizer=normalizer,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        views=views,
        progress=progress and dist_info.is_main,
    )
    return merge_shards(all_gather_objects(part), num_items=len(dataset), views=views)


def predict_shard(
    model: nn.Module,
    dataset: Any,
    *,
    shard: list[int],
    device: torch.device,
    normalizer: VideoNormalizer,
    batch_size: int,
    num_workers: int,
    precision: str,
    views: tuple[int, int],
    progress: bool = False,
) -> dict[str, Any]:
    """View-averaged probabilities for the dataset indices in `shard` (one rank's share).

    Returns:
        {"indices": int64 [n], "labels": int64 [n], "probs": float32 [n, C]} for the videos that
        decoded, and "failed": the indices of those that did not; all on the CPU.
    """
    num_classes = int(dataset.num_classes)
    num_views = views[0] * views[1]
    model = _unwrap(model)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=shard,  # a plain list of indices: no shuffling, no padding
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        worker_init_fn=ignore_stop_signals,
        generator=private_generator(0),
    )

    indices: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    probs: list[torch.Tensor] = []
    failed: list[int] = []
    # Restore each module's own mode afterwards: model.train() would also flip sub-modules the
    # trainer keeps in eval mode on purpose (e.g. a frozen backbone).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="eval", disable=not progress):
                ok_B = ~batch["failed"].bool()
                failed.extend(batch["index"][~ok_B].tolist())
                if not ok_B.any():
                    continue
                video_BVTCHW = batch["video"][ok_B]
                mask_BVT = batch["mask"][ok_B]
                B, V = video_BVTCHW.shape[:2]
                if V != num_views:
                    raise ValueError(
                        f"the dataset gives {V} views per video but views={tuple(views)} "
                        f"(clips x crops = {num_views}): build it with matching test_clips/test_crops"
                    )
                video = normalizer(video_BVTCHW.flatten(0, 1).to(device, non_blocking=True))
                mask = mask_BVT.flatten(0, 1).to(device, non_blocking=True)
                with autocast(device, precision):
                    logits = model(video, mask)
                if logits.shape[-1] != num_classes:
                    raise ValueError(
                        f"the model has {logits.shape[-1]} outputs but the dataset has {num_classes} classes"
                    )
                # Softmax per view in fp32, then the mean over the V views of each video.
                probs_BC = logits.float().softmax(dim=-1).view(B, V, -1).mean(dim=1)
                probs.append(probs_BC.cpu())
                indices.append(batch["index"][ok_B].long())
                labels.append(batch["label"][ok_B].long())
    finally:
        for m, mode in modes:
            m.training = mode

    return {
        "indices": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        "probs": torch.cat(probs) if probs else torch.zeros(0, num_classes),
        "failed": failed,
    }


def merge_shards(parts: list[dict[str, Any]], *, num_items: int, views: tuple[int, int]) -> EvalResult:
    """Concatenate the ranks' `predict_shard` outputs, check each index appears exactly once,
    and compute the metrics."""
    indices = torch.cat([p["indices"] for p in parts])
    failed = sorted(i for p in parts for i in p["failed"])
    seen = indices.tolist() + failed
    assert len(seen) == num_items and set(seen) == set(range(num_items)), (
        f"eval shards do not cover the {num_items} videos exactly once ({len(seen)} results, {len(set(seen))} distinct)"
    )
    order = indices.argsort()
    indices = indices[order]
    labels = torch.cat([p["labels"] for p in parts])[order]
    probs = torch.cat([p["probs"] for p in parts])[order]
    if indices.numel() == 0:
        raise ValueError(
            f"none of the {num_items} eval videos could be decoded ({len(failed)} failed): "
            "check dataset.root and dataset.decoder"
        )
    metrics = _compute_metrics(labels, probs)
    return EvalResult(
        **metrics,
        num_videos=indices.numel(),
        num_failed=len(failed),
        views=(int(views[0]), int(views[1])),
        indices=indices,
        labels=labels,
        probs=probs,
        failed_indices=failed,
    )


# ----------------------------------------------------------------------------------------------
# The eval.py app


def default_eval_dir(ckpt: str) -> str:
    """Where `eval.py` writes by default: `<run>/eval/<stamp>` next to the checkpoint's run.

    `<run>` is the folder above `checkpoints/` (the trainer's layout), else the checkpoint's own
    folder; `<stamp>` the time, the same on every rank of a torchrun job.

    Raises:
        FileNotFoundError: the checkpoint does not exist (checked here, before Hydra creates the
            output folder, so a typo leaves no stray folders).
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: ckpt={ckpt}")
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    # Under torchrun eval.py first makes every rank agree on one stamp (distributed.agree_on_run_stamp).
    stamp = os.environ.get(RUN_STAMP_ENV, time.strftime("%Y-%m-%d/%H-%M-%S")).replace("/", "_")
    return str(run / "eval" / stamp)


def merge_dataset_overrides(
    stored: Mapping[str, Any], overrides: Mapping[str, Any] | None, *, allow_new: tuple[str, ...] = ()
) -> DictConfig:
    """The checkpoint's dataset config with the non-null eval overrides applied.

    The stored config is resolved, so paths the training config derived from `root`
    (`${dataset.root}/val.txt`...) hold the old root: when `root` is overridden, every top-level
    string that lies under the old root is moved under the new one (an explicit override of such
    a key still wins).

    Args:
        stored: the dataset config stored in the checkpoint.
        overrides: the eval config's `dataset` block (null values keep the stored value).
        allow_new: top-level keys that may be added although the stored config lacks them (the
            annotation file of a split the training run did not use, e.g. `test_file`).

    Raises:
        ValueError: an override names a key the stored dataset config does not have.
    """
    merged = OmegaConf.create(dict(stored))
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "root" in overrides and "root" in merged and merged.root is not None:
        old_root, new_root = PurePath(str(merged.root)), PurePath(str(overrides["root"]))
        for key, value in merged.items():
            if key != "root" and isinstance(value, str):
                try:
                    merged[key] = str(new_root / PurePath(value).relative_to(old_root))
                except ValueError:  # not under the old root: an explicit path, kept
                    pass
    for key in allow_new:
        if key in overrides and key not in merged:
            merged[key] = overrides[key]
    _apply_overrides(merged, overrides, prefix="dataset")
    return merged


def _apply_overrides(node: DictConfig, overrides: Mapping[str, Any], *, prefix: str) -> None:
    for key, value in overrides.items():
        if key not in node:
            raise ValueError(
                f"{prefix}.{key}={value} overrides a key the checkpoint's dataset config does not have "
                f"(keys of {prefix}: {', '.join(sorted(str(k) for k in node))})"
            )
        if isinstance(value, Mapping) and isinstance(node[key], Mapping):
            # `+dataset.generate.seed=1` changes one key of the block, not the whole block.
            _apply_overrides(node[key], value, prefix=f"{prefix}.{key}")
        else:
            node[key] = value


def resolve_num_workers(num_workers: int | str) -> int:
    """`auto` -> this rank's share of the CPU cores, 1 to 8; ints pass through."""
    if num_workers == "auto":
        return default_num_workers()
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be auto or an int >= 0, got {num_workers!r}")
    return num_workers


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def select_weights(state: Mapping[str, Any], use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict to evaluate and its name ("ema" or "model").

    EMA weights when asked for and present; a wrapper's `module.` / torch.compile's `_orig_mod.`
    prefix is removed so the state dict fits the bare `VideoClassifier`.
    """
    if use_ema and state.get("ema") is not None:
        weights, name = state["ema"], "ema"
    else:
        if use_ema:
            log.warning("use_ema=true but the checkpoint has no EMA weights: evaluating the model weights")
        weights, name = state["model"], "model"
    for prefix in ("module.", "_orig_mod."):
        weights = _strip_prefix(weights, prefix)
    return weights, name


def build_model_from_checkpoint(state: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild the `VideoClassifier` from the stored config and load `weights` (strict)."""
    from squarefuse.models import build_classifier  # noqa: PLC0415 (keeps `import evaluator` light)

    cfg = OmegaConf.create(state["config"])
    backbone_cfg = OmegaConf.merge(cfg.backbone, {"pretrained": False, "pretrained_path": None})
    # Every weight comes from the checkpoint: never touch the hub or the pretrained file again.
    model = build_classifier(backbone_cfg, cfg.fusion, cfg.head, num_classes=len(state["class_names"]))
    model.load_state_dict(weights, strict=True)
    return model


def summary_lines(result: EvalResult, *, weights: str, ckpt: str | None = None, split: str | None = None) -> list[str]:
    """Human-readable summary of a multi-view evaluation."""
    clips, crops = result.views
    lines = [
        f"checkpoint: {ckpt}" if ckpt else None,
        f"weights: {weights}",
        f"split: {split}" if split else None,
        f"views: {clips} clips x {crops} crops",
        f"videos: {result.num_videos} evaluated, {result.num_failed} failed to decode",
        f"top-1: {result.top1:.2f}%  top-{result.topk}: {result.top5:.2f}%  "
        f"mean-class: {result.mean_class_acc:.2f}%  loss: {result.loss:.4f}",
    ]
    return [line for line in lines if line is not None]


def run_eval(cfg: DictConfig, run_dir: str | Path) -> EvalResult:
    """The eval app: load `cfg.ckpt`, evaluate it on `cfg.split` with multi-view testing.

    Args:
        cfg: the composed `configs/eval.yaml` (ckpt, use_ema, split, batch_size, num_workers,
            device, precision, progress, dataset overrides).
        run_dir: where the result files go (written by rank 0 only).

    Returns:
        The `EvalResult` (the same on every rank).
    """
    from squarefuse.datasets import build_dataset  # noqa: PLC0415
    from squarefuse.engine.results import write_results  # noqa: PLC0415
    from squarefuse.models.complexity import model_complexity  # noqa: PLC0415

    if cfg.get("ckpt") is None:
        raise ValueError("ckpt is required: python eval.py ckpt=PATH/TO/checkpoint.pt")
    ckpt = str(cfg.ckpt)
    state = load_checkpoint(ckpt)
    for key in ("config", "class_names"):
        if key not in state:
            raise ValueError(f"{ckpt} has no '{key}' entry: it was not written by the squarefuse trainer")
    class_names = list(state["class_names"])
    split = str(cfg.split)
    dataset_cfg = merge_dataset_overrides(
        state["config"]["dataset"], cfg.get("dataset"), allow_new=(f"{split}_file", f"{split}_video_dir")
    )

    was_initialised = torch.distributed.is_initialized()
    dist_info, device = init_distributed(str(cfg.device))
    try:
        run_dir = Path(run_dir)
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        weights, weights_name = select_weights(state, bool(cfg.use_ema))
        model = build_model_from_checkpoint(state, weights).to(device)
        dataset = build_dataset(dataset_cfg, split, views=True, report_dir=run_dir if dist_info.is_main else None)
        if dataset.num_classes != len(class_names):
            raise ValueError(
                f"the checkpoint has {len(class_names)} classes but the {split} split of "
                f"dataset.root={dataset_cfg.get('root')} has {dataset.num_classes}"
            )
        if list(dataset.class_names) != class_names:
            log.warning("the dataset's class names differ from the checkpoint's; labels are compared by id")
        views = (dataset.sampler.num_clips, dataset.num_crops)
        precision = resolve_precision(str(cfg.precision), device)
        result = evaluate(
            model,
            dataset,
            device=device,
            normalizer=VideoNormalizer(model.mean, model.std, device),
            batch_size=int(cfg.batch_size),
            num_workers=resolve_num_workers(cfg.num_workers),
            precision=precision,
            dist_info=dist_info,
            views=views,
            progress=bool(cfg.get("progress", False)),
        )
        if dist_info.is_main:
            meta = {
                "checkpoint": str(Path(ckpt).resolve()),
                "step": state.get("step"),
                "epoch": state.get("epoch"),
                "weights": weights_name,
                "split": split,
                "dataset": dataset_cfg.get("name"),
                "dataset_root": dataset_cfg.get("root"),
                "num_frames": dataset_cfg.get("num_frames"),
                "precision": precision,
                "world_size": dist_info.world_size,
                "model_info": model_complexity(model, int(dataset_cfg.num_frames), model.backbone.img_size),
            }
            write_results(result, run_dir, class_names, dataset.records, missing=dataset.missing, meta=meta)
            for line in summary_lines(result, weights=weights_name, ckpt=ckpt, split=split):
                log.info(line)
            if dataset.missing:
                log.info(f"{len(dataset.missing)} videos were missing at start-up and left out (see {run_dir})")
            log.info(f"results written to {run_dir}")
        return result
    finally:
        if not was_initialised:
            shutdown()
