"""report.md (a markdown table readable in a terminal, and the runs left out of it) and report.csv.

Run folder names, group labels and notes come from the user's files: in report.md they are escaped
(`markdown_text`) or code spans (`markdown_code`, paths and commands), never raw Markdown or HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from squarefuse.config.compose_config import shell_override
from squarefuse.evaluation.metrics import METRICS
from squarefuse.report.aggregate import GroupSummary, Stat
from squarefuse.runtime.safe_text import csv_writer, markdown_code, markdown_text


def human_count(value: float | None) -> str:
    """1234567 -> 1.23M; None -> '-'."""
    if value is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _p_text(summary: GroupSummary) -> str:
    if summary.is_baseline:
        return "baseline"
    comparison = summary.comparison
    if comparison is None or comparison.baseline is None:
        return "-"
    if comparison.test is None:
        return "refused (see below)"
    test = comparison.test
    return f"{test.p_value:.3g} (b={test.b}, c={test.c})"


def columns() -> list[str]:
    """report.md's header: an "eval <title>" column per registered metric (`metrics.METRICS`)."""
    return [
        "group",
        "runs (finished/all)",
        "final val top-1",
        "best val top-1",
        *(f"eval {metric.label()}" for metric in METRICS.values()),
        "reversal drop",
        "fusion params",
        "fusion FLOPs/clip",
        "train clips/s",
        "wall time",
        "McNemar p vs baseline",
    ]


def table_row(s: GroupSummary) -> list[str]:
    eval_n = f" (n={s.eval_top1.n})" if s.eval_top1.n and s.eval_top1.n != len(s.finished) else ""
    drop_n = f" (n={s.reversal_drop.n})" if s.reversal_drop.n and s.reversal_drop.n != s.eval_top1.n else ""
    evals = [s.evals[name].text(metric.digits) for name, metric in METRICS.items()]
    return [
        s.label,
        f"{len(s.finished)}/{len(s.group.runs)}",
        s.final_top1.text(),
        s.best_top1.text(),
        evals[0] + eval_n,  # the evaluated runs, counted once (every eval column has them)
        *evals[1:],
        s.reversal_drop.text() + drop_n,
        human_count(s.fusion_params),
        human_count(s.fusion_flops),
        s.clips_per_s.text(1),
        human_duration(s.wall_s.mean),
        _p_text(s),
    ]


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    # Padded columns: the table reads as well in a terminal as rendered; a newline in a name (a path
    # in a group's label) would end the row.
    cells = [list(header)] + [[markdown_text(c).replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    return [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])]


def write_markdown(
    summaries: Sequence[GroupSummary],
    path: Path,
    *,
    sources: Sequence[str],
    baseline_note: str,
    notes: Sequence[str],
    plots: Sequence[str],
) -> None:
    lines = [
        "# Fusion comparison report",
        "",
        f"Runs from: {', '.join(map(markdown_code, sources))}",
        "",
        *_markdown_table(columns(), [table_row(s) for s in summaries]),
        "",
        "Accuracies in percent, mean ± sample std over the finished runs of each group (seeds); "
        "val = clip-level validation during training (final = last epoch), eval = `eval.py` multi-view "
        f"test (latest normal-order evaluation of each run); {_direction_note()}. Reversal drop = eval "
        "top-1 with the frames in order minus with `frame_order=reversed` (percentage points). Params and FLOPs from "
        "`model_info.json` ('-': not recorded). McNemar: exact two-sided test on per-video correctness, "
        "pooled over the seeds both groups evaluated; b = videos only the baseline gets right, "
        "c = videos only this group gets right.",
        "",
        markdown_text(baseline_note),
        "",
    ]
    refused = [s for s in summaries if s.comparison is not None and s.comparison.refused]
    if refused:
        lines += ["## Pairing refused", ""]
        lines += [f"- {markdown_text(s.label)}: {markdown_text(s.comparison.refused)}" for s in refused] + [""]
    left_out = [(s, r) for s in summaries for r in s.not_counted]
    if left_out:
        lines += ["## Runs not in the means", ""]
        lines += [
            f"- {markdown_code(r.path)} ({markdown_text(s.label)}): "
            + markdown_text(r.status + (f", {r.problem}" if r.problem else ""))
            for s, r in left_out
        ]
        lines += [""]
    incomplete = [(s, e) for s in summaries for r in s.group.runs for e in r.incomplete_evals]
    if incomplete:
        lines += ["## Incomplete evaluations (not used)", ""]
        lines += [
            f"- {markdown_code(e)} ({markdown_text(s.label)}): no results.json or a result file missing: the eval "
            "failed part-way or is still running; see its eval.log, rerun it"
            for s, e in incomplete
        ]
        lines += [""]
    unevaluated = [(s, r) for s in summaries for r in s.finished if r.eval_for("normal") is None]
    if unevaluated:
        lines += ["## Finished runs without an evaluation", ""]
        # The command as a code span of its own: copied from the rendered report or the file, it runs
        # as it reads (bash's $'...' for a folder name with a newline, `shell_override`).
        lines += [
            f"- {markdown_code(r.path)} ({markdown_text(s.label)}): no eval/*/results.json with frame_order=normal; "
            f"run {markdown_code('python eval.py ' + shell_override('ckpt', r.path / 'checkpoints' / 'best.pt'))}"
            for s, r in unevaluated
        ]
        lines += [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {markdown_text(n)}" for n in notes] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path.write_text("\n".join(lines))


def _direction_note() -> str:
    """Which eval columns are better when lower (a loss), from the registry."""
    lower = [f"eval {m.label()}" for m in METRICS.values() if not m.higher_is_better]
    return f"lower is better for {', '.join(lower)}, higher for the others" if lower else "higher is better"


def _stat_cells(stat: Stat) -> list[object]:
    return [stat.n, "" if stat.mean is None else f"{stat.mean:.4f}", "" if stat.std is None else f"{stat.std:.4f}"]


def write_csv(summaries: Sequence[GroupSummary], path: Path) -> None:
    """One row per group; means and stds in separate columns, empty when undefined."""
    evals = {f"eval_{name}": name for name in METRICS}  # report.csv name -> metric name
    stats = ["final_top1", "best_top1", *evals, "reversal_drop", "clips_per_s", "wall_s"]
    header = ["group", "num_runs", "num_finished"]
    for name in stats:
        header += [f"{name}_n", f"{name}_mean", f"{name}_std"]
    header += [
        "fusion_params",
        "fusion_flops_per_clip",
        "total_params",
        "total_flops_per_clip",
        "baseline",
        "mcnemar_b",
        "mcnemar_c",
        "mcnemar_p",
        "paired_seeds",
        "pairing_refused",
    ]
    with open(path, "w", newline="") as f:
        writer = csv_writer(f)
        writer.writerow(header)
        for s in summaries:
            row: list[object] = [s.label, len(s.group.runs), len(s.finished)]
            for name in stats:
                row += _stat_cells(s.evals[evals[name]] if name in evals else getattr(s, name))
            comparison = s.comparison
            test = comparison.test if comparison else None
            row += [
                "" if s.fusion_params is None else int(s.fusion_params),
                "" if s.fusion_flops is None else int(s.fusion_flops),
                "" if s.total_params is None else int(s.total_params),
                "" if s.total_flops is None else int(s.total_flops),
                "(this group)"
                if s.is_baseline
                else (comparison.baseline.label if comparison and comparison.baseline else ""),
                "" if test is None else test.b,
                "" if test is None else test.c,
                "" if test is None else f"{test.p_value:.6g}",
                "" if test is None else " ".join(map(str, test.seeds)),
                comparison.refused if comparison and comparison.refused else "",
            ]
            writer.writerow(row)
