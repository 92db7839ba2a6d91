"""Per-group numbers: mean and std over seeds, costs, and the paired test against the baseline.

Means are over the group's finished runs (eval numbers: over those that were also evaluated);
std is the sample standard deviation (n - 1), undefined for a single run.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from squarefuse.evaluation.metrics import METRICS, Metric
from squarefuse.report.groups import Group
from squarefuse.report.runs import FINISHED, Prediction, Run, read_predictions
from squarefuse.report.significance import PairedTest, PairingError, paired_test


@dataclass
class Stat:
    """n values summarised; mean/std None when there are none (std also for a single value)."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, digits: int = 2) -> str:
        if not self.values:
            return "-"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def _stat(values: Sequence[float | None]) -> Stat:
    return Stat([float(v) for v in values if v is not None])


def reversal_drop(run: Run) -> float | None:
    """Eval top-1 with the frames in order minus with the frames reversed (percentage points)."""
    normal, reversed_ = run.eval_for("normal"), run.eval_for("reversed")
    if normal is None or reversed_ is None:
        return None
    if normal.results.get("top1") is None or reversed_.results.get("top1") is None:
        return None
    return float(normal.results["top1"]) - float(reversed_.results["top1"])


def model_cost(runs: Sequence[Run], kind: str, part: str) -> float | None:
    """`model_info.json[kind][part]` of the group's first run that has one (the same config
    gives the same model, whatever the seed). The fusion's cost includes the fusion layers
    inserted after backbone blocks (`block_fusions`)."""
    parts = ("fusion", "block_fusions") if part == "fusion" else (part,)
    for run in runs:
        costs = (run.model_info or {}).get(kind) or {}
        values = [float(costs[p]) for p in parts if costs.get(p) is not None]
        if values:
            return sum(values)
    return None


@dataclass
class Comparison:
    """The paired test of a group against its baseline, or why there is none."""

    baseline: Group | None
    test: PairedTest | None = None
    refused: str | None = None


@dataclass
class GroupSummary:
    group: Group
    finished: list[Run]
    evaluated: list[Run]
    final_top1: Stat
    best_top1: Stat
    evals: dict[str, Stat]  # metric name (`metrics.METRICS`) -> its eval values over `evaluated`
    reversal_drop: Stat
    clips_per_s: Stat
    wall_s: Stat
    fusion_params: float | None
    fusion_flops: float | None
    total_params: float | None
    total_flops: float | None
    is_baseline: bool = False
    comparison: Comparison | None = None
    not_counted: list[Run] = field(default_factory=list)  # unfinished / crashed / interrupted

    @property
    def label(self) -> str:
        return self.group.label

    @property
    def eval_top1(self) -> Stat:
        return self.evals["top1"]


def summarise(group: Group) -> GroupSummary:
    finished = [r for r in group.runs if r.status == FINISHED]
    evaluated = [r for r in finished if r.eval_for("normal") is not None]

    def eval_stat(metric: Metric) -> Stat:
        return _stat([metric.read(r.eval_for("normal").results) for r in evaluated])

    return GroupSummary(
        group=group,
        finished=finished,
        evaluated=evaluated,
        final_top1=_stat([r.final_top1 for r in finished]),
        best_top1=_stat([r.best_top1 for r in finished]),
        evals={name: eval_stat(metric) for name, metric in METRICS.items()},
        reversal_drop=_stat([reversal_drop(r) for r in finished]),
        clips_per_s=_stat([r.clips_per_s for r in finished]),
        wall_s=_stat([r.wall_s for r in finished]),
        fusion_params=model_cost(group.runs, "params", "fusion"),
        fusion_flops=model_cost(group.runs, "flops_per_clip", "fusion"),
        total_params=model_cost(group.runs, "params", "total"),
        total_flops=model_cost(group.runs, "flops_per_clip", "total"),
        not_counted=[r for r in group.runs if r.status != FINISHED],
    )


def _by_seed(runs: Sequence[Run], label: str) -> dict[Any, Run]:
    seeds: dict[Any, Run] = {}
    for run in runs:
        if run.seed in seeds:
            raise PairingError(
                f"{label} has two evaluated runs with trainer.seed={run.seed} ({seeds[run.seed].path}, {run.path})"
            )
        seeds[run.seed] = run
    return seeds


def seed_pairs(baseline: GroupSummary, other: GroupSummary) -> list[tuple[Any, Run, Run]]:
    """(seed, baseline run, other run) for every seed both groups evaluated."""
    base_seeds = _by_seed(baseline.evaluated, baseline.label)
    other_seeds = _by_seed(other.evaluated, other.label)
    common = [s for s in other_seeds if s in base_seeds]
    return [(s, base_seeds[s], other_seeds[s]) for s in sorted(common, key=str)]


def predictions(run: Run) -> dict[str, Prediction]:
    evaluation = run.eval_for("normal")
    assert evaluation is not None, run.path
    return read_predictions(evaluation.predictions_path)


def compare(baseline: GroupSummary, other: GroupSummary) -> Comparison:
    """Exact McNemar of `other` against `baseline`, pooled over matching seeds; refused with the
    reason when the runs cannot be paired."""
    try:
        pairs = seed_pairs(baseline, other)
        test = paired_test([(seed, predictions(b), predictions(o)) for seed, b, o in pairs])
    except ValueError as e:  # a PairingError, or a missing / unreadable predictions.csv
        return Comparison(baseline=baseline.group, refused=str(e))
    return Comparison(baseline=baseline.group, test=test)


def per_class_accuracy(runs: Sequence[Run]) -> dict[str, float]:
    """Class name -> top-1 (percent) over the pooled eval videos of `runs`."""
    hits: dict[str, list[bool]] = {}
    for run in runs:
        for pred in predictions(run).values():
            hits.setdefault(pred.label_name, []).append(pred.correct)
    return {name: 100.0 * sum(h) / len(h) for name, h in hits.items()}
