"""The extract app: `python scripts/extract.py ckpt=PATH [split=val | input=VIDEO|FOLDER|LIST_FILE]`.

Per video, the feature the classifier's final linear layer reads (the head's pooled, normalised
token: `VideoClassifier.forward_head(..., pre_logits=True)`), averaged over the eval views; with
`aux=true` also the fusion's statistics (SQuaRe-Fuse: soft quantiles [N,K,Q] and Legendre trend
[N,K,P+1] of every token), averaged over the views. Written to the output folder:

features.npy        float32 [n, D], one row per video that decoded, in dataset (or input) order
aux_<name>.npy      float32 [n, ...] with aux=true (aux_quantiles.npy, aux_trend.npy)
videos.csv          row, index, id, path, label: row r of every array is this file's row r (cells
                    that a spreadsheet would run as a formula start with `'`: `safe_text.csv_value`)
failed.csv          index, id, path, error of the videos that did not decode (when any)
extract.json        what was extracted (checkpoint, weights, split or input, views, counts, shapes);
                    written last, so its presence means the folder is complete

Under torchrun each rank extracts its share of the videos (`shard_indices`: every video once, no
padding) and rank 0 checks that the shares cover every video exactly once, then writes. Every
file is written atomically. Rerunning into a complete folder with the same settings does nothing;
`overwrite=true` redoes it (extract.json is removed first, so an interrupted redo never looks
complete); a complete folder of other settings is an error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from squarefuse.api import load_model
from squarefuse.apps.batch_settings import batch_settings
from squarefuse.config.dataset_overrides import merge_dataset_overrides
from squarefuse.datasets.inputs import find_videos
from squarefuse.datasets.preprocess import EvalPreprocess
from squarefuse.evaluation.evaluator import shard_indices
from squarefuse.evaluation.inference_loop import run_batches
from squarefuse.runtime.atomic_file import atomic_write
from squarefuse.runtime.distributed import all_gather_objects, broadcast_object, distributed_session
from squarefuse.runtime.safe_text import csv_writer

__all__ = ["COMPLETE_FILE", "checkpoint_preprocess", "run_extract"]

log = logging.getLogger(__name__)

COMPLETE_FILE = "extract.json"


def _request(cfg: DictConfig, weights: str, views: tuple[int, int]) -> dict[str, Any]:
    """The settings that decide what an extraction folder holds."""
    return {
        "checkpoint": str(Path(str(cfg.ckpt)).resolve()),
        "weights": weights,
        "input": None if cfg.get("input") is None else str(Path(str(cfg.input)).resolve()),
        "split": None if cfg.get("input") is not None else str(cfg.split),
        "views": list(views),
        "aux": bool(cfg.aux),
    }


def _existing(run_dir: Path, request: dict[str, Any], overwrite: bool) -> bool:
    """True when `run_dir` already holds this extraction; prepares the folder otherwise."""
    done = run_dir / COMPLETE_FILE
    if not done.is_file():
        return False
    previous = json.loads(done.read_text(encoding="utf-8"))
    if overwrite:
        done.unlink()  # first: an interrupted redo must not look complete
        for name in previous.get("files", {}):
            (run_dir / name).unlink(missing_ok=True)
        return False
    differ = [k for k, v in request.items() if previous.get(k) != v]
    if differ:
        raise ValueError(
            f"{run_dir} holds a complete extraction with other settings "
            f"({', '.join(f'{k}: {previous.get(k)!r} there, {request[k]!r} now' for k in differ)}): "
            "choose another hydra.run.dir or set overwrite=true"
        )
    return True


def checkpoint_preprocess(model: Any, cfg: DictConfig, device: torch.device) -> EvalPreprocess:
    """The eval views of `cfg.split` of the checkpoint's dataset, with the app's `dataset.*` overrides and `views`."""
    split = str(cfg.split)
    dataset_cfg = merge_dataset_overrides(
        model.info["config"]["dataset"], cfg.get("dataset"), allow_new=(f"{split}_file", f"{split}_video_dir")
    )
    return EvalPreprocess(
        dataset_cfg,
        class_names=model.class_names,
        mean=model.model.mean,
        std=model.model.std,
        device=device,
        views=cfg.get("views"),
    )


def run_extract(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Extract per-video features of a dataset split or of the videos `cfg.input` names.

    Args:
        cfg: the composed `configs/extract.yaml` (ckpt, split, input, views, aux, use_ema,
            batch_size, num_workers, device, precision, progress, overwrite, dataset overrides).
        run_dir: the output folder (written by rank 0 only).

    Returns:
        The summary written to extract.json (the same on every rank).
    """
    from squarefuse.datasets import build_dataset  # noqa: PLC0415 (only the split mode needs annotations)

    if cfg.get("ckpt") is None:
        raise ValueError("ckpt is required: python scripts/extract.py ckpt=PATH [split=val | input=PATH]")
    run_dir = Path(run_dir)
    with distributed_session(str(cfg.device)) as (dist_info, device):
        model = load_model(str(cfg.ckpt), use_ema=bool(cfg.use_ema), device=device)
        split = str(cfg.split)
        preprocess = checkpoint_preprocess(model, cfg, device)
        request = _request(cfg, model.weights, preprocess.views)
        skip = None
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            skip = _existing(run_dir, request, bool(cfg.overwrite))
        if broadcast_object(skip):
            summary = json.loads((run_dir / COMPLETE_FILE).read_text(encoding="utf-8"))
            log.info(f"{run_dir} already holds this extraction ({summary['num_videos']} videos): nothing to do")
            return summary

        if cfg.get("input") is not None:
            dataset = preprocess.dataset(find_videos(str(cfg.input)))
        else:
            dataset = build_dataset(
                preprocess.dataset_cfg, split, views=True, report_dir=run_dir if dist_info.is_main else None
            )
        aux = bool(cfg.aux)
        classifier = model.model

        def features(video: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            h, stats = classifier.forward_features(video, mask)
            out = {"features": classifier.forward_head(h, mask, pre_logits=True)}
            if aux:
                if not stats:
                    raise ValueError(f"aux=true but the fusion ({type(classifier.fusion).__name__}) has no statistics")
                out.update({f"aux_{name}": value for name, value in stats.items()})
            return out

        settings = batch_settings(cfg, device, preprocess.normalizer)
        shard = shard_indices(len(dataset), dist_info.rank, dist_info.world_size)
        progress = bool(cfg.progress) and dist_info.is_main
        part = run_batches(features, dataset, settings, shard=shard, progress=progress, desc="extract")
        # Merged and checked on every rank, so that an error stops all of them, not rank 0 alone.
        merged = _merge(all_gather_objects(part), num_videos=len(dataset))
        summary = {**request, "world_size": dist_info.world_size}
        if dist_info.is_main:
            summary = _write(merged, dataset, run_dir, summary)
        return broadcast_object(summary)


def _merge(parts: list[dict[str, Any]], *, num_videos: int) -> dict[str, Any]:
    """The ranks' `run_batches` outputs in dataset order, checked to cover every video exactly once."""
    indices = torch.cat([p["indices"] for p in parts])
    errors = {i: e for p in parts for i, e in p["errors"].items()}
    seen = indices.tolist() + list(errors)
    assert len(seen) == num_videos and set(seen) == set(range(num_videos)), (
        f"extract shards do not cover the {num_videos} videos exactly once ({len(seen)} results)"
    )
    if indices.numel() == 0:
        raise ValueError(
            f"none of the {num_videos} videos could be decoded; first error: {next(iter(errors.values()))}"
        )
    order = indices.argsort()
    names = next(list(p["outputs"]) for p in parts if p["outputs"])  # a rank whose videos all failed has none
    outputs = {name: torch.cat([p["outputs"][name] for p in parts if p["outputs"]])[order] for name in names}
    return {"indices": indices[order], "outputs": outputs, "errors": dict(sorted(errors.items()))}


def _write(merged: dict[str, Any], dataset: Any, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the arrays, videos.csv and failed.csv, then extract.json last."""
    indices, errors = merged["indices"], merged["errors"]
    shapes = {}
    for name, values in merged["outputs"].items():
        array = values.numpy()
        with atomic_write(run_dir / f"{name}.npy", "wb") as f:
            np.save(f, array)
        shapes[f"{name}.npy"] = list(array.shape)
    with atomic_write(run_dir / "videos.csv") as f:
        writer = csv_writer(f)
        writer.writerow(["row", "index", "id", "path", "label"])
        for row, index in enumerate(indices.tolist()):
            record = dataset.records[index]
            writer.writerow([row, index, record.id, record.path, record.label])
    failed = run_dir / "failed.csv"
    if errors:
        with atomic_write(failed) as f:
            writer = csv_writer(f)
            writer.writerow(["index", "id", "path", "error"])
            for index, error in errors.items():
                record = dataset.records[index]
                writer.writerow([index, record.id, record.path, error])
        log.warning(f"{len(errors)} of {len(dataset)} videos did not decode and have no features: see {failed}")
    else:
        failed.unlink(missing_ok=True)  # from an overwritten extraction
    summary = {**summary, "num_videos": int(indices.numel()), "num_failed": len(errors), "files": shapes}
    with atomic_write(run_dir / COMPLETE_FILE) as f:
        json.dump(summary, f, indent=1)
    log.info(f"features of {summary['num_videos']} videos ({shapes}) written to {run_dir}")
    return summary
