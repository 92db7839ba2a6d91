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
import hashlib
import json
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from squarefuse.checkpoint import find_damaged_member, load_weights_only
from squarefuse.config.resolvers import launch_dir
from squarefuse.evaluation.evaluator import merge_shards, name_videos
from squarefuse.evaluation.metrics import EvalResult, non_finite_rows
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

    probs.pt is checked before it is used: against the sha256 results.json recorded when it was
    written or, in folders of older versions, the CRC-32 of each member of its zip archive (the
    check of every checkpoint read, `squarefuse.checkpoint.find_damaged_member`), and its values:
    one row of C finite probabilities summing to 1 for each video of predictions.csv, with the same
    labels.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: a file is damaged, or the files do not agree with each other (the file and
            the first video named).
    """
    folder = Path(folder)
    for name in ("probs.pt", "predictions.csv", "results.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}; pass folders written by eval.py")
    redo = "evaluate the checkpoint again into a new folder (eval.py), or copy the folder again from where it was made"
    try:
        summary = json.loads((folder / "results.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / 'results.json'} is damaged, not JSON ({e}): {redo}") from None
    path = folder / "probs.pt"
    _check_probs_file(path, summary.get("probs_sha256"), redo)
    saved = load_weights_only(path, named=str(path))
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not isinstance(saved, dict) or not {"indices", "labels", "probs", "class_names"} <= saved.keys():
        raise ValueError(f"{path} lacks the entries eval.py writes (indices, labels, probs, class_names); {redo}")
    indices = saved["indices"].long()
    if [int(r["index"]) for r in rows] != indices.tolist():
        raise ValueError(f"{folder}: predictions.csv and probs.pt list different videos")
    output = EvalOutput(
        folder=folder,
        indices=indices,
        labels=saved["labels"].long(),
        probs=saved["probs"].float(),
        class_names=[str(c) for c in saved["class_names"]],
        ids=[csv_value(r["id"]) for r in rows],
        paths=[csv_value(r["path"]) for r in rows],
        summary=summary,
    )
    _check_probs(output, [int(r["label"]) for r in rows], redo)
    return output


def _check_probs_file(path: Path, sha256: str | None, redo: str) -> None:
    """probs.pt is the file eval.py wrote: its sha256 is the one results.json recorded or, in folders
    of older versions (no sha256 recorded), each member of its zip archive matches its CRC-32."""
    if sha256 is not None:
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise ValueError(
                f"{path} is not the file eval.py wrote with the results.json beside it (its sha256 differs from the "
                f"one recorded there): damaged (a flipped bit, an interrupted copy) or replaced since; {redo}"
            )
        return
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is empty or truncated ({size} bytes, not the zip archive torch.save writes); {redo}")
    try:
        bad = find_damaged_member(path)
    except Exception as e:  # noqa: BLE001 - a damaged directory raises many kinds; all mean the same
        bad = f"its zip directory ({e})"
    if bad is not None:
        raise ValueError(f"{path} is damaged: {bad} does not match the CRC-32 stored when it was written; {redo}")


def _check_probs(output: EvalOutput, csv_labels: list[int], redo: str) -> None:
    """One row of finite probabilities summing to 1 per video, and the labels of predictions.csv."""
    path = output.folder / "probs.pt"
    num_classes = len(output.class_names)
    num_videos = len(output.indices)
    if tuple(output.probs.shape) != (num_videos, num_classes) or tuple(output.labels.shape) != (num_videos,):
        raise ValueError(
            f"{path}: probs has shape {tuple(output.probs.shape)} and labels {tuple(output.labels.shape)}, not "
            f"[videos, classes] = [{num_videos}, {num_classes}] and [{num_videos}]; {redo}"
        )
    if output.labels.tolist() != csv_labels:
        row = next(i for i, (a, b) in enumerate(zip(output.labels.tolist(), csv_labels, strict=True)) if a != b)
        raise ValueError(f"{path}: the label of video {output.key(row)!r} differs from predictions.csv; {redo}")
    bad = non_finite_rows(output.probs)
    if bad:
        raise ValueError(
            f"{path}: the probabilities of {len(bad)} videos are NaN or infinite "
            f"({name_videos([repr(output.key(row)) for row in bad])}): they cannot be ensembled (a NaN would be "
            "scored by its argmax). Evaluate the checkpoint again (eval.py now stops on such outputs and names "
            "their cause)"
        )
    sums = output.probs.double().sum(dim=1)
    off = ((output.probs < 0) | (output.probs > 1)).any(dim=1) | ((sums - 1).abs() > 1e-3)
    if off.any():
        row = int(off.nonzero()[0])
        raise ValueError(
            f"{path}: the probabilities of video {output.key(row)!r} are not a distribution (values in [0, 1] "
            f"summing to 1; here min {float(output.probs[row].min()):.4g}, max {float(output.probs[row].max()):.4g}, "
            f"sum {float(sums[row]):.4g}; {int(off.sum())} such videos): the file was damaged or changed; {redo}"
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
