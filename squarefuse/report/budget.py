"""The temporal benchmark's second axis, sample efficiency: what each option reaches within a short
budget of optimiser steps (the earlier protocol's fixed 96), next to what it reaches when trained
until val stops improving, and per task the val curves against optimiser steps.

Both numbers are the trainer's val top-1, the number that picks best.pt (the test split is read only
by the matrix): at the budget, the last validation at or before that step; converged, the best
validation (the one `best.pt` holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from squarefuse.report.aggregate import Stat
from squarefuse.report.groups import benchmark_option, benchmark_task, group_choice
from squarefuse.report.runs import FINISHED, Run
from squarefuse.runtime.safe_text import plot_text

__all__ = ["budget_markdown", "plot_budget_curves", "top1_within"]

OLD_BUDGET_STEPS = 96  # 12 epochs x 8 steps: every run of the earlier temporal benchmark


def top1_within(run: Run, steps: int) -> float | None:
    """The val top-1 of the run's last validation at or before optimiser step `steps`."""
    within = [top1 for step, top1 in run.val_steps if step <= steps]
    return within[-1] if within else None


def _by_task_and_option(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    heads = {str(group_choice(run, "head")) for run in runs}
    grouped: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.status != FINISHED:
            continue
        grouped.setdefault((benchmark_task(run), benchmark_option(run, heads)), []).append(run)
    return grouped


def budget_markdown(runs: Sequence[Run], steps: int = OLD_BUDGET_STEPS) -> str:
    """Per task and option: val top-1 within `steps` and converged (mean ± std over seeds); the option
    that learns fastest (the highest mean within `steps`) named per task."""
    grouped = _by_task_and_option(runs)
    lines = [
        f"## Sample efficiency: val top-1 (%) within {steps} optimiser steps and converged",
        "",
        "| task | option | within budget | converged (best val) | steps run | n |",
        "|---|---|---|---|---|---|",
    ]
    fastest: dict[str, tuple[float, str]] = {}
    for (task, option), members in sorted(grouped.items()):
        early = Stat([v for r in members if (v := top1_within(r, steps)) is not None])
        best = Stat([r.best_top1 for r in members if r.best_top1 is not None])
        ran = Stat([float(r.val_steps[-1][0]) for r in members if r.val_steps])
        lines.append(f"| {task} | {option} | {early.text(1)} | {best.text(1)} | {ran.text(0)} | {len(members)} |")
        if early.mean is not None and early.mean > fastest.get(task, (-1.0, ""))[0]:
            fastest[task] = (early.mean, option)
    lines += [
        "",
        "Fastest within the budget (the highest mean): " + ", ".join(f"{t}: {o}" for t, (_, o) in fastest.items()),
    ]
    return "\n".join(lines) + "\n"


def plot_budget_curves(runs: Sequence[Run], out_dir: Path, steps: int = OLD_BUDGET_STEPS) -> list[str]:
    """`budget_<task>.png` per task: mean val top-1 over seeds against optimiser steps, a
    line per option, the budget marked. Returns the file names written."""
    grouped = _by_task_and_option(runs)
    written = []
    for task in sorted({task for task, _ in grouped}):
        fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        for (t, option), members in sorted(grouped.items()):
            if t != task:
                continue
            grid = sorted({step for r in members for step, _ in r.val_steps})
            mean = [np.mean([v for r in members if (v := top1_within(r, s)) is not None]) for s in grid]
            ax.plot(grid, mean, marker=".", label=plot_text(f"{option} (n={len(members)})"))
        ax.axvline(steps, color="grey", linestyle="--", linewidth=1, label=f"{steps} steps")
        ax.set_xlabel("optimiser steps")
        ax.set_ylabel("val top-1 (%)")
        ax.set_title(plot_text(f"{task}: val top-1 against optimiser steps, mean over seeds"))
        ax.legend(fontsize=7, loc="lower right")
        name = f"budget_{task}.png"
        fig.savefig(out_dir / name)
        written.append(name)
    return written
