"""Result files of an evaluation: the numbers, per-class table, per-video predictions, a plot.

results.json           every metric of `metrics.METRICS` by name (accuracies in percent; top-k's k
                       in `topk`), counts of evaluated / failed / missing videos, views, the
                       failed videos, and whatever `meta` the caller adds (checkpoint...)
per_class.csv          class_id, class, support, correct, top1, topk_acc
predictions.csv        one row per evaluated video: index, id, path, label, pred, prob, topk_ids,
                       topk_probs (k = min(5, classes), results.json's `topk`)
probs.pt               indices, labels, averaged probs [N, C] and class names (for ensembling;
                       `torch.load(weights_only=True)` reads it); results.json's `probs_sha256` is
                       its sha256, which the ensemble checks before trusting it
confusion_matrix.png   row-normalised; class names on the axes up to 40 classes

Every file is written atomically (`atomic_write`) and results.json last, after results.json of an
earlier evaluation into the same folder is removed: an evaluation that fails part-way (a full
disk...) leaves no results.json, so nothing reads its folder as complete (`eval_files.is_complete`;
scripts/report.py lists such folders). CSV cells from user data (class names, ids, paths) are
guarded against spreadsheet formulas (`squarefuse.runtime.safe_text`). Probabilities that are not
finite are refused (they would be scored by their argmax), and results.json is strict JSON (no NaN).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from matplotlib.figure import Figure

from squarefuse.evaluation.eval_files import RESULTS_FILE
from squarefuse.evaluation.metrics import EvalResult, non_finite_rows
from squarefuse.runtime.atomic_file import atomic_write
from squarefuse.runtime.safe_text import csv_writer, plot_text

_MAX_TICK_LABELS = 40  # beyond this, names overlap into an unreadable block
_MAX_CELL_TEXT = 15  # per-cell numbers only while the cells are big enough to hold them
# Tick labels longer than this are shortened in the middle, where long names of one dataset tend to
# agree (the full names are in per_class.csv): an SSv2 class name of 100 characters took the whole
# figure, leaving the matrix a sliver and its title clipped.
_MAX_TICK_CHARS = 40
# Title characters a line per inch of the matrix's side (12 pt text is ~14 an inch; the tick labels
# and the colour bar take part of the figure's width): a longer title wraps, centred over the matrix.
_TITLE_CHARS_PER_INCH = 8


def _tick_label(name: str) -> str:
    """`name`, or its start and end around "..." when it is longer than `_MAX_TICK_CHARS`."""
    if len(name) <= _MAX_TICK_CHARS:
        return name
    keep = (_MAX_TICK_CHARS - 3) // 2
    return f"{name[:keep].rstrip()}...{name[-keep:].lstrip()}"


def _finite_or_none(x: float) -> float | None:
    # json.dump would write NaN, which is not JSON.
    return x if math.isfinite(x) else None


def _record_fields(records: Sequence[Any] | None, index: int) -> tuple[str, str]:
    if records is None:
        return "", ""
    record = records[index]
    return str(getattr(record, "id", "")), str(getattr(record, "path", ""))


def write_results(
    result: EvalResult,
    out_dir: str | Path,
    class_names: Sequence[str],
    records: Sequence[Any] | None = None,
    *,
    missing: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write results.json, per_class.csv, predictions.csv, probs.pt and confusion_matrix.png.

    Every number comes from `result` (its `metrics` and `scores`, computed once in metrics.py).

    Args:
        result: what `evaluate` returned.
        out_dir: folder to write into (created if needed).
        class_names: name of each class id.
        records: the dataset's records (`.id`, `.path`), indexed like the dataset; None leaves
            the id/path columns empty.
        missing: paths found missing at start-up (only their number goes into results.json; the
            dataset writes the full list).
        meta: extra entries for results.json (checkpoint, step, weights, split...).

    Raises:
        ValueError: some probabilities are NaN or infinite, or another value of results.json is
            (`evaluator.check_finite` names the videos first).
    """
    out_dir = Path(out_dir)
    _check_writable(result, out_dir, class_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier evaluation's results.json would make this folder look complete while it is rewritten.
    (out_dir / RESULTS_FILE).unlink(missing_ok=True)
    summary = _results_summary(result, records, missing=missing, meta=meta)
    # Before the first file is written: the probabilities' bytes, their digest (the ensemble's check
    # that probs.pt is the file written with this results.json) and results.json as strict JSON.
    probs_file = io.BytesIO()
    torch.save(
        {"indices": result.indices, "labels": result.labels, "probs": result.probs, "class_names": list(class_names)},
        probs_file,
    )
    summary["probs_sha256"] = hashlib.sha256(probs_file.getvalue()).hexdigest()
    results_text = _strict_json(summary)

    with atomic_write(out_dir / "per_class.csv") as f:
        _write_per_class(f, result, class_names)
    with atomic_write(out_dir / "predictions.csv") as f:
        _write_predictions(f, result, class_names, records)
    with atomic_write(out_dir / "probs.pt", "wb") as f:
        f.write(probs_file.getvalue())
    with atomic_write(out_dir / "confusion_matrix.png", "wb") as f:
        plot_confusion_matrix(result.scores.confmat, class_names, f, conditions=_conditions(summary))
    with atomic_write(out_dir / RESULTS_FILE) as f:
        f.write(results_text)


def _check_writable(result: EvalResult, out_dir: Path, class_names: Sequence[str]) -> None:
    """Finite probabilities (a NaN row would be scored by its argmax) and one name per class."""
    bad_rows = non_finite_rows(result.probs)
    if bad_rows:
        first = [int(result.indices[row]) for row in bad_rows[:5]]
        raise ValueError(
            f"{out_dir}: not writing results with NaN or infinite probabilities for {len(bad_rows)} videos "
            f"(dataset indices {first}...): they would be scored by their argmax"
        )
    num_classes = result.probs.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a result over {num_classes} classes")


def _results_summary(
    result: EvalResult,
    records: Sequence[Any] | None = None,
    *,
    missing: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """results.json's entries (less `probs_sha256`): every registered metric by name, `topk` (its k),
    the counts, views and failed videos, then `meta`."""
    summary: dict[str, Any] = {name: _finite_or_none(value) for name, value in result.metrics.items()}
    summary.update(
        {
            "topk": result.topk,
            "num_videos": result.num_videos,
            "num_failed": result.num_failed,
            "num_missing": len(missing) if missing is not None else None,
            "views": {"clips": result.views[0], "crops": result.views[1]},
            "num_classes": result.probs.shape[1],
            "failed_videos": [
                {"index": i, "id": _record_fields(records, i)[0], "path": _record_fields(records, i)[1]}
                for i in result.failed_indices
            ],
        }
    )
    summary.update(meta or {})
    return summary


def _write_per_class(f: IO[str], result: EvalResult, class_names: Sequence[str]) -> None:
    """per_class.csv: support, correct, top-1 and top-k accuracy (percent) of each class."""
    s = result.scores
    support = s.confmat.sum(dim=1)
    topk_correct = torch.zeros(len(class_names), dtype=torch.long).index_add_(0, s.labels, s.topk_hits.long())
    writer = csv_writer(f)
    writer.writerow(["class_id", "class", "support", "correct", "top1", "topk_acc"])
    for c, name in enumerate(class_names):
        n = int(support[c])
        correct = int(s.confmat[c, c])
        top1 = f"{100.0 * correct / n:.2f}" if n else ""
        topk = f"{100.0 * int(topk_correct[c]) / n:.2f}" if n else ""
        writer.writerow([c, name, n, correct, top1, topk])


PREDICTION_COLUMNS = (
    "index",
    "id",
    "path",
    "label",
    "label_name",
    "pred",
    "pred_name",
    "prob",
    "correct",
    "topk_ids",
    "topk_probs",
)


def _write_predictions(
    f: IO[str], result: EvalResult, class_names: Sequence[str], records: Sequence[Any] | None
) -> None:
    """predictions.csv: one row per evaluated video, with its top-k classes and their probabilities."""
    s = result.scores
    writer = csv_writer(f)
    writer.writerow(PREDICTION_COLUMNS)
    for row in range(result.num_videos):
        index = int(result.indices[row])
        label = int(s.labels[row])
        pred = int(s.preds[row])
        video_id, path = _record_fields(records, index)
        writer.writerow(
            [
                index,
                video_id,
                path,
                label,
                class_names[label],
                pred,
                class_names[pred],
                f"{float(s.topk_probs[row, 0]):.6f}",
                int(pred == label),
                " ".join(str(int(c)) for c in s.topk_ids[row]),
                " ".join(f"{float(p):.6f}" for p in s.topk_probs[row]),
            ]
        )


def _strict_json(summary: Mapping[str, Any]) -> str:
    """results.json's text; a NaN or infinity (`json` would write the non-JSON `NaN`) is an error naming its key."""
    bad = next(_non_finite_values(summary, ""), None)
    if bad is not None:
        raise ValueError(f"results.json: {bad[0]} is {bad[1]}, which JSON cannot hold")
    return json.dumps(summary, indent=2, allow_nan=False)  # allow_nan=False: the guard behind the check


def _non_finite_values(value: Any, key: str) -> Iterator[tuple[str, float]]:
    """(key, value) of every NaN or infinity in a nest of dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        yield key, value
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield from _non_finite_values(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _non_finite_values(item, f"{key}[{i}]")


def _conditions(summary: Mapping[str, Any]) -> list[str]:
    """The evaluation's non-default choices, for the confusion matrix's title: a reversed-frames
    matrix must not look like the in-order one."""
    conditions = []
    if summary.get("split") not in (None, "val"):
        conditions.append(f"split {summary['split']}")
    if summary.get("frame_order") not in (None, "normal"):
        conditions.append(f"frames {summary['frame_order']}")
    return conditions


def plot_confusion_matrix(
    confmat: torch.Tensor,
    class_names: Sequence[str],
    path: str | Path | IO[bytes],
    *,
    conditions: Sequence[str] = (),
) -> None:
    """Row-normalised confusion matrix (each row: how a true class was predicted) as a PNG.

    `conditions` (e.g. "frames reversed") are added to the title.

    Uses a bare `Figure` (Agg canvas) rather than pyplot: no global state, no display needed.
    Class names are drawn as plain text (`plot_text`): a `$` in a name is not math; long ones are
    shortened to `_MAX_TICK_CHARS` characters, and a long title wraps to the matrix's width.
    """
    num_classes = confmat.shape[0]
    support = confmat.sum(dim=1, keepdim=True).clamp_min(1)
    rates = (confmat.double() / support).numpy()
    side = min(16.0, max(5.0, 0.45 * num_classes + 2.0))
    fig = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    details = [f"{int(confmat.sum())} videos, {num_classes} classes", *conditions]
    title = textwrap.fill(f"confusion matrix ({'; '.join(details)})", int(side * _TITLE_CHARS_PER_INCH))
    ax.set_title(plot_text(title))
    if num_classes <= _MAX_TICK_LABELS:
        names = [plot_text(_tick_label(str(name))) for name in class_names]
        ax.set_xticks(range(num_classes), labels=names, rotation=90, fontsize=8)
        ax.set_yticks(range(num_classes), labels=names, fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if num_classes <= _MAX_CELL_TEXT:
        for i in range(num_classes):
            for j in range(num_classes):
                if confmat[i, j] > 0:
                    ax.text(
                        j,
                        i,
                        str(int(confmat[i, j])),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    fig.savefig(path, format="png")


def summary_lines(result: EvalResult, *, weights: str, ckpt: str | None = None, split: str | None = None) -> list[str]:
    """Human-readable summary of a multi-view evaluation."""
    clips, crops = result.views
    lines = [
        f"checkpoint: {ckpt}" if ckpt else None,
        f"weights: {weights}",
        f"split: {split}" if split else None,
        f"views: {clips} clips x {crops} crops",
        f"videos: {result.num_videos} evaluated, {result.num_failed} failed to decode",
        result.metrics_text(),
    ]
    return [line for line in lines if line is not None]
