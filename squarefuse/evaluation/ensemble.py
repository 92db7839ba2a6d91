"""Ensembles: the weighted mean of the saved probabilities of several evaluations of the same videos.

Each `eval.py` folder holds ``probs.pt`` (dataset indices, labels, view-averaged probabilities
[N, C], class names), ``predictions.csv`` (the id and path of each row) and ``results.json`` (the
videos that failed to decode). Videos are matched by their dataset id (the path when there is
none), so the evaluations may come from different checkpoints, views or frame counts, but they must
cover the same videos with the same labels and the same class list: anything else is refused with
the first video or class that differs. The ensemble is written with eval's own result writer.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from squarefuse.config.resolvers import launch_dir
from squarefuse.evaluation.evaluator import merge_shards
from squarefuse.evaluation.metrics import EvalResult
from squarefuse.evaluation.results import summary_lines, write_results
from squarefuse.runtime.safe_text import csv_value

log = logging.getLogger(__name__)

__all__ = ["EvalOutput", "default_ensemble_dir", "ensemble", "read_eval_dir", "run_ensemble"]


@dataclass
class EvalOutput:
    """What an eval folder holds, one row per evaluated video in dataset-index order."""

    folder: Path
    indices: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor
    class_names: list[str]
    ids: list[str]
    paths: list[str]
    summary: dict[str, Any]

    def key(self, row: int) -> str:
        """The name that identifies the video of `row` across evaluations."""
        return self.ids[row] or self.paths[row] or f"index {int(self.indices[row])}"


def read_eval_dir(folder: str | Path) -> EvalOutput:
    """Reads the probs.pt, predictions.csv and results.json of one `eval.py` output folder.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: the files do not agree with each other.
    """
    folder = Path(folder)
    for name in ("probs.pt", "predictions.csv", "results.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}; pass folders written by eval.py")
    saved = torch.load(folder / "probs.pt", map_location="cpu", weights_only=True)
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    indices = saved["indices"].long()
    if [int(r["index"]) for r in rows] != indices.tolist():
        raise ValueError(f"{folder}: predictions.csv and probs.pt list different videos")
    return EvalOutput(
        folder=folder,
        indices=indices,
        labels=saved["labels"].long(),
        probs=saved["probs"].float(),
        class_names=[str(c) for c in saved["class_names"]],
        ids=[csv_value(r["id"]) for r in rows],
        paths=[csv_value(r["path"]) for r in rows],
        summary=json.loads((folder / "results.json").read_text()),
    )


def _check_same_videos(first: EvalOutput, other: EvalOutput) -> list[int]:
    """Rows of `other` in the order of `first`'s videos; raises on any difference, naming the video."""
    if other.class_names != first.class_names:
        if len(other.class_names) != len(first.class_names):
            raise ValueError(
                f"{other.folder} has {len(other.class_names)} classes but {first.folder} has {len(first.class_names)}"
            )
        c = next(i for i, (a, b) in enumerate(zip(first.class_names, other.class_names, strict=True)) if a != b)
        raise ValueError(
            f"{other.folder} and {first.folder} differ in class {c}: "
            f"{other.class_names[c]!r} vs {first.class_names[c]!r}"
        )
    rows = {}
    for row in range(len(other.ids)):
        if rows.setdefault(other.key(row), row) != row:
            raise ValueError(f"{other.folder}: video {other.key(row)!r} appears twice")
    order = []
    for row in range(len(first.ids)):
        key = first.key(row)
        if key not in rows:
            raise ValueError(f"video {key!r} of {first.folder} is not in {other.folder}: the evaluations differ")
        if int(other.labels[rows[key]]) != int(first.labels[row]):
            raise ValueError(
                f"video {key!r} has label {int(other.labels[rows[key]])} in {other.folder} but "
                f"{int(first.labels[row])} in {first.folder}"
            )
        order.append(rows.pop(key))
    if rows:
        extra = min(rows.values())
        raise ValueError(
            f"video {other.key(extra)!r} of {other.folder} is not in {first.folder}: the evaluations differ"
        )
    return order


def ensemble(outputs: Sequence[EvalOutput], weights: Sequence[float] | None = None) -> EvalResult:
    """The weighted mean of the probabilities of `outputs` (equal weights by default), with metrics.

    Rows, dataset indices and failed videos are those of the first output.
    """
    if not outputs:
        raise ValueError("an ensemble needs at least one eval folder")
    weights = [1.0] * len(outputs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(outputs):
        raise ValueError(f"{len(weights)} weights for {len(outputs)} eval folders")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    first = outputs[0]
    probs = torch.zeros_like(first.probs, dtype=torch.float64)
    for output, weight in zip(outputs, weights, strict=True):
        probs += weight * output.probs[_check_same_videos(first, output)].double()
    probs /= sum(weights)

    failed = [int(v["index"]) for v in first.summary.get("failed_videos", [])]
    num_items = len(first.indices) + len(failed)
    if sorted(first.indices.tolist() + failed) != list(range(num_items)):
        raise ValueError(
            f"{first.folder}: the videos of probs.pt and the failed_videos of results.json do not cover the "
            f"dataset indices 0..{num_items - 1} once: not an eval.py folder?"
        )
    views = first.summary.get("views") or {"clips": 0, "crops": 0}
    part = {"indices": first.indices, "labels": first.labels, "probs": probs.float(), "failed": failed}
    return merge_shards([part], num_items=num_items, views=(views["clips"], views["crops"]))


def default_ensemble_dir() -> Path:
    """``ensembles/<date>_<time>`` under the current folder (git-ignored), ``_2``... for another
    ensemble made in the same second (`launch_dir`)."""
    return Path(launch_dir("ensembles", sep="_"))


def run_ensemble(
    eval_dirs: Sequence[str | Path], *, weights: Sequence[float] | None = None, out_dir: str | Path | None = None
) -> EvalResult:
    """Reads the eval folders, ensembles them and writes eval's result files to `out_dir`.

    results.json also lists the members (folder, weight, checkpoint, views, top1) under
    ``ensemble``. An `out_dir` that already holds results is refused (nothing is overwritten).
    """
    outputs = [read_eval_dir(d) for d in eval_dirs]
    result = ensemble(outputs, weights)
    out_dir = Path(out_dir) if out_dir is not None else default_ensemble_dir()
    if (out_dir / "results.json").exists():
        raise FileExistsError(f"{out_dir} already holds results.json: choose another --out")

    first = outputs[0]
    num_items = len(first.indices) + result.num_failed
    records: list[Any] = [SimpleNamespace(id="", path="") for _ in range(num_items)]
    for row, index in enumerate(first.indices.tolist()):
        records[index] = SimpleNamespace(id=first.ids[row], path=first.paths[row])
    for video in first.summary.get("failed_videos", []):
        records[int(video["index"])] = SimpleNamespace(id=video.get("id", ""), path=video.get("path", ""))
    weights = [1.0] * len(outputs) if weights is None else [float(w) for w in weights]
    meta = {
        "ensemble": [
            {
                "eval_dir": str(o.folder.resolve()),
                "weight": w,
                "checkpoint": o.summary.get("checkpoint"),
                "views": o.summary.get("views"),
                "num_frames": o.summary.get("num_frames"),
                "top1": o.summary.get("top1"),
            }
            for o, w in zip(outputs, weights, strict=True)
        ],
        "num_missing": first.summary.get("num_missing"),
        "split": first.summary.get("split"),
        "dataset": first.summary.get("dataset"),
    }
    write_results(result, out_dir, first.class_names, records, meta=meta)
    for line in summary_lines(result, weights=f"ensemble of {len(outputs)} evaluations"):
        log.info(line)
    log.info(f"results written to {out_dir}")
    return result
