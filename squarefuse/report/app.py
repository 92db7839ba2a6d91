"""The `scripts/report.py` app: run folders -> groups -> report.md, report.csv and plots."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from squarefuse.report.aggregate import Comparison, GroupSummary, compare, summarise
from squarefuse.report.budget import budget_markdown, plot_budget_curves
from squarefuse.report.groups import baseline_for, find_baseline, group_runs, parse_terms
from squarefuse.report.matrix import matrix_markdown, plot_matrix, task_fusion_matrix, write_matrix_csv
from squarefuse.report.plots import (
    plot_accuracy_vs_flops,
    plot_per_class_gain,
    plot_training_curves,
    why_no_accuracy_vs_flops,
)
from squarefuse.report.runs import expected_jobs, find_run_dirs, load_run
from squarefuse.report.write import write_csv, write_markdown

DEFAULT_BASELINE = ("fusion=none",)


@dataclass
class Report:
    summaries: list[GroupSummary]
    out_dir: Path
    notes: list[str]
    plots: list[str]


def _compare_with_baselines(summaries: list[GroupSummary], terms: list[tuple[str, str]], explicit: bool) -> str:
    """Mark the baseline group(s), attach each other group's comparison; return a note for report.md."""
    spec = " ".join(f"{k}={v}" for k, v in terms)
    baselines = find_baseline([s.group for s in summaries], terms)
    if not baselines:
        labels = "; ".join(s.label for s in summaries)
        if explicit:
            raise ValueError(f"--baseline {spec} matches no group (groups: {labels})")
        return f"No group has {spec}: no paired test (choose one with --baseline KEY=VALUE)."
    by_group = {id(s.group): s for s in summaries}
    for summary in summaries:
        if summary.group in baselines:
            summary.is_baseline = True
            continue
        baseline = baseline_for(summary.group, baselines, terms)
        if baseline is None:
            summary.comparison = Comparison(
                baseline=None,
                refused=f"{len(baselines)} groups have {spec} and none agrees with this group on its other settings",
            )
        else:
            summary.comparison = compare(by_group[id(baseline)], summary)
    return f"Baseline ({spec}): " + "; ".join(b.label for b in baselines) + "."


def make_report(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    baseline: Sequence[str] | None = None,
    matrix: bool = False,
    split: str = "test",
) -> Report:
    """Find the runs under `paths`, aggregate them per group and write the report into `out_dir`.

    Args:
        paths: Hydra multirun folders, run folders, or any folders holding runs.
        out_dir: where report.md, report.csv and the PNG plots go (created).
        baseline: KEY=VALUE terms selecting the baseline group; None: `fusion=none` if any group has it.
        matrix: also write the temporal benchmark's task x fusion matrix of `split` top-1
            (matrix.md, matrix.csv, temporal_matrix.png; `squarefuse.report.matrix`) and its budget
            (budget.md, budget_<task>.png; `squarefuse.report.budget`).
        split: the evaluated split the matrix reads.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no run under `paths`, a malformed --baseline term, or an explicit baseline
            that matches no group.
    """
    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise ValueError(f"no run folder (config.yaml, metrics.jsonl or .hydra/) under {', '.join(map(str, paths))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    summaries = [summarise(g) for g in group_runs(runs)]
    terms = parse_terms(baseline if baseline else DEFAULT_BASELINE)
    baseline_note = _compare_with_baselines(summaries, terms, explicit=bool(baseline))

    notes = []
    for path in map(Path, paths):
        expected = expected_jobs(path)
        found = sum(1 for d in run_dirs if path.resolve() in d.resolve().parents)
        if expected is not None and found < expected:
            notes.append(
                f"{path}: the sweep asked for {expected} jobs but only {found} have a run folder "
                "(the sweep stopped early or is still running)"
            )
    plots = []
    for name, plot, why_not in (
        ("training_curves.png", plot_training_curves, "no finished run logged a train loss or a validation"),
        ("accuracy_vs_fusion_flops.png", plot_accuracy_vs_flops, why_no_accuracy_vs_flops(summaries)),
        ("per_class_gain.png", plot_per_class_gain, "no group could be paired with a baseline"),
    ):
        if plot(summaries, out_dir / name):
            plots.append(name)
        else:
            notes.append(f"{name} not drawn: {why_not}")

    write_markdown(
        summaries,
        out_dir / "report.md",
        sources=[str(p) for p in paths],
        baseline_note=baseline_note,
        notes=notes,
        plots=plots,
    )
    write_csv(summaries, out_dir / "report.csv")
    if matrix:
        verdict = task_fusion_matrix(runs, split=split)
        if not verdict.cells:
            raise ValueError(f"no finished run under {', '.join(map(str, paths))} was evaluated on split {split}")
        (out_dir / "matrix.md").write_text(matrix_markdown(verdict))
        write_matrix_csv(verdict, out_dir / "matrix.csv")
        plot_matrix(verdict, out_dir / "temporal_matrix.png")
        plots.append("temporal_matrix.png")
        # The second axis, sample efficiency: val top-1 within 96 steps and converged, and the val curves.
        (out_dir / "budget.md").write_text(budget_markdown(runs))
        plots += plot_budget_curves(runs, out_dir)
    return Report(summaries=summaries, out_dir=out_dir, notes=notes, plots=plots)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tables and plots from training runs: mean ± std over seeds per config, eval accuracy, "
        "reversal drop, fusion cost, and an exact McNemar test against a baseline group.",
    )
    parser.add_argument("paths", nargs="+", help="a Hydra multirun folder, run folders, or folders holding runs")
    parser.add_argument(
        "--baseline",
        nargs="+",
        metavar="KEY=VALUE",
        help="the baseline group, e.g. fusion=none (the default when such a group exists) or fusion.K=8",
    )
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="also the temporal benchmark's task x fusion matrix of test top-1 (matrix.md, matrix.csv, "
        "temporal_matrix.png): `square` against every other option per task, seeds as the unit (bootstrap "
        "interval, Welch, Holm), the tasks without a strong token control marked not informative",
    )
    parser.add_argument("--split", default="test", help="the evaluated split the matrix reads (default: test)")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: PATH/report for a single PATH, else ./report)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out or (Path(args.paths[0]) / "report" if len(args.paths) == 1 else Path("report"))
    try:
        report = make_report(args.paths, out_dir, baseline=args.baseline, matrix=args.matrix, split=args.split)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print((report.out_dir / "report.md").read_text())
    if args.matrix:
        print((report.out_dir / "matrix.md").read_text())
    print(f"written to {report.out_dir}: report.md, report.csv" + "".join(f", {p}" for p in report.plots))
    return 0
