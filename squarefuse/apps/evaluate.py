"""The eval app behind `eval.py`: checkpoint -> model -> eval split -> multi-view test -> result files.

`run_eval` loads the checkpoint, rebuilds its model (`checkpoint.build_model_from_checkpoint`),
builds the split from the stored dataset config with the eval overrides applied, runs
`evaluator.evaluate` on every rank, and has rank 0 write the result files (`results.write_results`)
into `<run>/eval/<stamp>` or `hydra.run.dir`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from squarefuse.checkpoint import build_model_from_checkpoint, load_checkpoint, select_weights
from squarefuse.config.resolvers import launch_dir
from squarefuse.datasets import build_dataset
from squarefuse.datasets.preprocess import VideoNormalizer
from squarefuse.evaluation.evaluator import evaluate
from squarefuse.evaluation.frame_order import check_frame_order
from squarefuse.evaluation.metrics import EvalResult
from squarefuse.evaluation.results import write_results
from squarefuse.models.complexity import model_complexity
from squarefuse.runtime.distributed import init_distributed, shutdown
from squarefuse.runtime.precision import resolve_precision
from squarefuse.runtime.workers import resolve_num_workers

log = logging.getLogger(__name__)


def default_eval_dir(ckpt: str, subdir: str = "eval") -> str:
    """Where `eval.py` writes by default: `<run>/eval/<stamp>` next to the checkpoint's run
    (`<run>/<subdir>/<stamp>` for the other apps that read a checkpoint: predict, extract, export).

    `<run>` is the folder above `checkpoints/` (the trainer's layout), else the checkpoint's own
    folder; `<stamp>` the launch time (`2026-12-02_09-31-05`), the same on every rank of a torchrun
    job, with `_2`, `_3`... for jobs started in the same second (`config.resolvers.launch_dir`: the
    folder is created here, owned by this launch).

    Raises:
        FileNotFoundError: the checkpoint does not exist (checked here, before any folder is
            created, so a typo leaves no stray folders).
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: ckpt={ckpt}")
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return launch_dir(str(run / subdir), sep="_")


# The keys every dataset config has, with their defaults (configs/dataset/base.yaml).
DATASET_BASE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "dataset" / "base.yaml"


def _keys_added_since(stored: DictConfig) -> dict[str, Any]:
    """Default values of the dataset keys a checkpoint's config predates (added to base.yaml later).

    Interpolated and required (`???`) defaults are left out: every checkpoint has those keys.
    """
    if not DATASET_BASE_CONFIG.is_file():
        return {}
    base = OmegaConf.load(DATASET_BASE_CONFIG)
    return {
        key: base[key]
        for key in base
        if key not in stored and not OmegaConf.is_interpolation(base, key) and not OmegaConf.is_missing(base, key)
    }


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

    A key the checkpoint predates (added to configs/dataset/base.yaml since) gets its default, and
    the log says so, so that older checkpoints keep working.

    Raises:
        ValueError: an override names a key the stored dataset config does not have.
    """
    merged = OmegaConf.create(dict(stored))
    added = _keys_added_since(merged)
    if added:
        log.info("the checkpoint's dataset config predates %s: using the defaults %s", sorted(added), added)
        merged = OmegaConf.merge(merged, added)
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
    if cfg.get("ckpt") is None:
        raise ValueError("ckpt is required: python eval.py ckpt=PATH/TO/checkpoint.pt")
    frame_order, frame_order_seed = str(cfg.frame_order), cfg.frame_order_seed
    check_frame_order(frame_order, frame_order_seed)
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
        precision = resolve_precision(str(cfg.precision), device)
        result = evaluate(
            model,
            dataset,
            device=device,
            normalizer=VideoNormalizer(model.mean, model.std, device),
            batch_size=int(cfg.batch_size),
            num_workers=resolve_num_workers(cfg.num_workers, key="num_workers"),
            precision=precision,
            dist_info=dist_info,
            progress=bool(cfg.get("progress", False)),
            frame_order=frame_order,
            frame_order_seed=frame_order_seed,
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
                "frame_order": frame_order,
                "frame_order_seed": frame_order_seed if frame_order == "shuffled" else None,
            }
            write_results(result, run_dir, class_names, dataset.records, missing=dataset.missing, meta=meta)
            for line in summary_lines(result, weights=weights_name, ckpt=ckpt, split=split):
                log.info(line)
            if frame_order != "normal":
                log.info(f"frame order: {frame_order} (the frames of every view reordered before the model)")
            if dataset.missing:
                log.info(f"{len(dataset.missing)} videos were missing at start-up and left out (see {run_dir})")
            log.info(f"results written to {run_dir}")
        return result
    finally:
        if not was_initialised:
            shutdown()
