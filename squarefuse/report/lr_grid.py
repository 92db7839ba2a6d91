"""The temporal benchmark's learning-rate choice: per task and fusion, the rate with the best mean
val score over the grid's seeds (never the test split), and every grid point for the report.

A run's val score is the number that picked its `best.pt`: its best val top-1 during training
(the benchmark's runs validate over every view of each val video, `trainer.val_views=all`, so
that is the multi-view val top-1 eval.py would give on val), the same rule for every option.

Runs are keyed by `dataset.task` (absent: ``direction``), the option (the fusion's Hydra choice,
`pixels+<fusion>` for the pixel control: `groups.fusion_option`) and `optim.lr`;
a run that did not finish counts as missing, never as zero.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from squarefuse.report.groups import benchmark_task, flatten, fusion_option
from squarefuse.report.runs import FINISHED, Run

__all__ = ["GridPoint", "choose_lrs", "grid_markdown", "params_note"]


@dataclass
class GridPoint:
    task: str
    fusion: str
    lr: float
    val_top1: list[float]  # the val score of each finished run (`val_score`)
    unfinished: int

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.val_top1) if self.val_top1 else None


def val_score(run: Run) -> float | None:
    """The run's best val top-1: the one its `best.pt` holds."""
    return run.best_top1


def _grid(runs: Sequence[Run]) -> dict[tuple[str, str], dict[float, GridPoint]]:
    grid: dict[tuple[str, str], dict[float, GridPoint]] = {}
    for run in runs:
        flat = flatten(run.config)
        task, fusion, lr = benchmark_task(run), fusion_option(run), flat["optim.lr"]
        point = grid.setdefault((task, fusion), {}).setdefault(float(lr), GridPoint(task, fusion, float(lr), [], 0))
        score = val_score(run)
        if run.status == FINISHED and score is not None:
            point.val_top1.append(score)
        else:
            point.unfinished += 1
    return grid


def choose_lrs(runs: Sequence[Run]) -> tuple[dict[tuple[str, str], float], list[GridPoint]]:
    """(task, fusion) -> the chosen lr, and every grid point (sorted). Ties go to the smaller lr.

    Raises:
        ValueError: a task and fusion without a single finished grid run.
    """
    chosen = {}
    points = []
    for key, by_lr in sorted(_grid(runs).items()):
        points += [by_lr[lr] for lr in sorted(by_lr)]
        scored = [p for p in by_lr.values() if p.mean is not None]
        if not scored:
            raise ValueError(f"task {key[0]}, fusion {key[1]}: no grid run finished, no learning rate to choose")
        chosen[key] = max(scored, key=lambda p: (p.mean, -p.lr)).lr
    return chosen, points


def grid_markdown(chosen: dict[tuple[str, str], float], points: Sequence[GridPoint]) -> str:
    """Every grid point's mean val top-1 (seeds), the chosen rate marked."""
    lines = [
        "## Learning-rate grid: val top-1 (%) of best.pt (the number that picked it), mean over the grid seeds",
        "",
        "| task | fusion | lr | val top-1 | seeds | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        mean = "-" if p.mean is None else f"{p.mean:.1f}"
        seeds = f"{len(p.val_top1)}" + (f" (+{p.unfinished} unfinished)" if p.unfinished else "")
        mark = "yes" if chosen.get((p.task, p.fusion)) == p.lr else ""
        lines.append(f"| {p.task} | {p.fusion} | {p.lr:g} | {mean} | {seeds} | {mark} |")
    return "\n".join(lines) + "\n"


def params_note(runs: Sequence[Run], reference: str = "square") -> str:
    """The fusion parameters of each option (model_info.json) and which have > 10 % more than `reference`."""
    params: dict[str, float] = {}
    for run in runs:
        fusion = fusion_option(run)
        counts = (run.model_info or {}).get("params") or {}
        if fusion not in params and counts.get("fusion") is not None:
            params[fusion] = float(counts["fusion"]) + float(counts.get("block_fusions") or 0)
    lines = ["## Fusion parameters", "", "| fusion | parameters | vs " + reference + " |", "|---|---|---|"]
    base = params.get(reference)
    for fusion, count in sorted(params.items()):
        if base:
            ratio = count / base
            note = f"{ratio:.2f}x" + (" (more than 10 % above)" if ratio > 1.1 else "")
        else:
            note = "-"
        lines.append(f"| {fusion} | {count:,.0f} | {note} |")
    return "\n".join(lines) + "\n"
