"""Accuracy on named class subsets and the twin confusion of time-opposite class pairs.

Subset files (``configs/class_subsets/*.txt``) list one class name a line; twin files one pair a
line, ``class | class``; ``#`` starts a comment. A name that is not one of the evaluated classes is
an error naming the file and the name, before anything is evaluated.

Twin confusion: among the videos whose label is one class of a pair, the share predicted as the
other class of that pair. A model blind to frame order confuses twins about as often as it gets them
right; a model that sees order hardly ever does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["class_subset_metrics", "read_class_subset", "read_twin_pairs", "subset_accuracy", "twin_confusion"]


def _lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"class subset file {path} does not exist")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def _index(name: str, class_names: Sequence[str], path: str | Path) -> int:
    try:
        return list(class_names).index(name)
    except ValueError:
        raise ValueError(f"{path}: {name!r} is not one of the {len(class_names)} evaluated classes") from None


def read_class_subset(path: str | Path, class_names: Sequence[str]) -> list[int]:
    """The class indices a subset file names."""
    indices = [_index(name, class_names, path) for name in _lines(path)]
    if not indices:
        raise ValueError(f"class subset file {path} names no class")
    return indices


def read_twin_pairs(path: str | Path, class_names: Sequence[str]) -> list[tuple[int, int]]:
    """The (class, class) index pairs of a twin file."""
    pairs = []
    for line in _lines(path):
        names = [name.strip() for name in line.split("|")]
        if len(names) != 2 or not all(names):
            raise ValueError(f"{path}: {line!r} is not a pair 'class | class'")
        pairs.append((_index(names[0], class_names, path), _index(names[1], class_names, path)))
    return pairs


def subset_accuracy(labels: Sequence[int], preds: Sequence[int], subset: Sequence[int]) -> dict[str, Any]:
    """Top-1 (percent) over the videos whose label is in `subset`; None when there are none."""
    members = set(subset)
    hits = [label == pred for label, pred in zip(labels, preds, strict=True) if label in members]
    return {"top1": 100.0 * sum(hits) / len(hits) if hits else None, "num_videos": len(hits)}


def twin_confusion(labels: Sequence[int], preds: Sequence[int], pairs: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """The share (percent) of a pair's videos predicted as the other class of the pair, over all
    pairs (`confusion`, videos pooled) and per pair."""
    per_pair = []
    total = confused = 0
    for a, b in pairs:
        other = {a: b, b: a}
        outcomes = [pred == other[label] for label, pred in zip(labels, preds, strict=True) if label in other]
        total, confused = total + len(outcomes), confused + sum(outcomes)
        per_pair.append(
            {
                "classes": [a, b],
                "num_videos": len(outcomes),
                "confusion": 100.0 * sum(outcomes) / len(outcomes) if outcomes else None,
            }
        )
    return {"confusion": 100.0 * confused / total if total else None, "num_videos": total, "pairs": per_pair}


def class_subset_metrics(
    labels: Sequence[int],
    preds: Sequence[int],
    class_names: Sequence[str],
    *,
    subset_files: Sequence[str | Path] = (),
    twin_file: str | Path | None = None,
) -> dict[str, Any]:
    """results.json's ``class_subsets`` (by file stem) and ``twin_confusion`` entries."""
    metrics: dict[str, Any] = {}
    if subset_files:
        metrics["class_subsets"] = {
            Path(f).stem: {"file": str(f), **subset_accuracy(labels, preds, read_class_subset(f, class_names))}
            for f in subset_files
        }
    if twin_file is not None:
        pairs = read_twin_pairs(twin_file, class_names)
        result = twin_confusion(labels, preds, pairs)
        for pair in result["pairs"]:
            pair["classes"] = [class_names[i] for i in pair["classes"]]
        metrics["twin_confusion"] = {"file": str(twin_file), **result}
    return metrics
