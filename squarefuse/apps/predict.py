"""The predict app: `python scripts/predict.py ckpt=PATH input=VIDEO|FOLDER|LIST_FILE`.

Every video gets its top-k classes with probabilities (softmax averaged over the checkpoint's eval
views, or `views=`). Written to the output folder, in input order:

predictions.csv    path, id, label (-1 when the input gave none), error, class_1, prob_1, ... class_k, prob_k
predictions.json   {"checkpoint", "weights", "views", "topk", "videos": [{"path", "id", "label",
                   "error", "top": [{"class", "class_id", "prob"}, ...]}, ...]}

A video that does not decode (or is missing from a list) gets its error and no classes; the run
goes on. The first `show` videos are also logged as a table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from squarefuse.api import load_model
from squarefuse.apps.batch_settings import batch_settings
from squarefuse.datasets.inputs import find_videos
from squarefuse.evaluation.inference_loop import run_batches
from squarefuse.runtime.atomic_file import atomic_write
from squarefuse.runtime.safe_text import csv_writer, printable

__all__ = ["format_table", "run_predict"]

log = logging.getLogger(__name__)


def run_predict(cfg: DictConfig, run_dir: str | Path) -> list[dict[str, Any]]:
    """Predict the top-k classes of every video `cfg.input` names.

    Args:
        cfg: the composed `configs/predict.yaml` (ckpt, input, topk, views, use_ema, batch_size,
            num_workers, device, precision, progress, show, dataset overrides).
        run_dir: where predictions.csv and predictions.json go.

    Returns:
        One dict per video, in input order (what predictions.json lists).
    """
    if cfg.get("ckpt") is None:
        raise ValueError("ckpt is required: python scripts/predict.py ckpt=PATH input=VIDEO|FOLDER|LIST_FILE")
    if cfg.get("input") is None:
        raise ValueError("input is required: a video file, a folder of videos or a list file (input=PATH)")
    topk = int(cfg.topk)
    if topk < 1:
        raise ValueError(f"topk={topk}: must be >= 1")
    records = find_videos(str(cfg.input))
    model = load_model(str(cfg.ckpt), use_ema=bool(cfg.use_ema), device=str(cfg.device), dataset=cfg.get("dataset"))
    preprocess = model.preprocess if cfg.get("views") is None else model.preprocess.with_views(cfg.views)
    present = [i for i, r in enumerate(records) if Path(r.path).is_file()]
    log.info(f"{len(records)} videos from {cfg.input}; {model.weights} weights; {preprocess}")

    out: dict[str, Any] = {"indices": torch.zeros(0, dtype=torch.long), "outputs": {}, "errors": {}}
    if present:
        dataset = preprocess.dataset([records[i] for i in present])

        def probabilities(video: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"probs": model.model(video, mask).float().softmax(dim=-1)}

        settings = batch_settings(cfg, model.device, preprocess.normalizer)
        out = run_batches(
            probabilities, dataset, settings, shard=range(len(dataset)), progress=bool(cfg.progress), desc="predict"
        )
    probs = dict(zip((present[i] for i in out["indices"].tolist()), out["outputs"].get("probs", []), strict=True))
    errors = {present[i]: message for i, message in out["errors"].items()}

    rows = []
    k = min(topk, len(model.class_names))
    for i, record in enumerate(records):
        row: dict[str, Any] = {"path": record.path, "id": record.id, "label": record.label, "error": None, "top": []}
        if i in probs:
            top = probs[i].topk(k)
            row["top"] = [
                {"class": model.class_names[c], "class_id": c, "prob": round(float(p), 6)}
                for p, c in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
        else:
            row["error"] = errors.get(i, f"video not found: {record.path}")
        rows.append(row)

    run_dir = Path(run_dir)
    clips, crops = preprocess.views
    summary = {
        "checkpoint": str(Path(str(cfg.ckpt)).resolve()),
        "weights": model.weights,
        "views": [clips, crops],
        "topk": k,
        "num_videos": len(rows),
        "num_failed": sum(row["error"] is not None for row in rows),
        "videos": rows,
    }
    _write_predictions(run_dir, summary, rows, k)

    for line in format_table(rows[: int(cfg.show)], topk=min(k, 3)):
        log.info(line)
    if len(rows) > int(cfg.show):
        log.info(f"... {len(rows) - int(cfg.show)} more")
    failed = summary["num_failed"]
    log.info(f"{len(rows)} videos, {failed} failed; predictions written to {run_dir}/predictions.csv and .json")
    return rows


def _write_predictions(run_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]], k: int) -> None:
    """Write predictions.json (the summary) and predictions.csv (one row per video, `k` class/prob pairs)."""
    with atomic_write(run_dir / "predictions.json") as f:
        json.dump(summary, f, indent=1)
    with atomic_write(run_dir / "predictions.csv") as f:
        writer = csv_writer(f)
        writer.writerow(
            ["path", "id", "label", "error"] + [f"{n}_{j}" for j in range(1, k + 1) for n in ("class", "prob")]
        )
        for row in rows:
            top = [v for t in row["top"] for v in (t["class"], t["prob"])] or [""] * (2 * k)
            writer.writerow([row["path"], row["id"], row["label"], row["error"] or "", *top])


def format_table(rows: list[dict[str, Any]], *, topk: int = 3, width: int = 40) -> list[str]:
    """Aligned text lines: video id | class (prob) for the best `topk`, or the error.

    Ids and class names come from file names and the checkpoint: control characters in them (a
    newline) are escaped, so each video stays on its line."""
    lines = []
    for row in rows:
        video_id = printable(row["id"])
        name = video_id if len(video_id) <= width else "..." + video_id[-(width - 3) :]
        if row["error"] is not None:
            cells = f"FAILED: {printable(row['error'].splitlines()[0] if row['error'] else '')}"
        else:
            cells = "  ".join(f"{printable(t['class'])} ({t['prob']:.3f})" for t in row["top"][:topk])
        lines.append(f"{name:<{width}}  {cells}")
    return lines
