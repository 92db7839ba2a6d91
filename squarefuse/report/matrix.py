"""The temporal benchmark's verdict: a task x fusion matrix of test top-1, with the paired test.

Rows are the synthetic task (`dataset.task`; a run without the key is the default ``direction``),
columns the fusion option (its Hydra choice). A cell holds the finished runs of that task and
fusion that were evaluated on `split` (frames in order): mean ± std of their top-1 over seeds and,
when the evaluations report it, of their twin confusion. Per row, the best cell (highest mean) is
marked, and every other cell is paired with it by the exact McNemar test on the test videos,
pooled over the seeds both evaluated: a cell with p >= `alpha` is not significantly different from
the best.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from squarefuse.report.aggregate import Stat
from squarefuse.report.groups import flatten, group_choice
from squarefuse.report.runs import FINISHED, EvalRun, Run, read_predictions
from squarefuse.report.significance import PairedTest, PairingError, paired_test
from squarefuse.runtime.safe_text import csv_value, markdown_text, plot_text

__all__ = ["Cell", "Matrix", "plot_matrix", "task_fusion_matrix", "write_matrix_csv", "matrix_markdown"]

DEFAULT_TASK = "direction"


@dataclass
class Cell:
    """The runs of one task and fusion evaluated on the split, and how they compare with the row's best."""

    runs: list[Run]
    evals: list[EvalRun]
    top1: Stat
    twin_confusion: Stat
    is_best: bool = False
    versus_best: PairedTest | None = None  # the paired test against the row's best cell
    refused: str | None = None  # why the cell could not be paired with the best

    def tied_with_best(self, alpha: float) -> bool:
        return self.is_best or (self.versus_best is not None and self.versus_best.p_value >= alpha)


@dataclass
class Matrix:
    tasks: list[str]
    fusions: list[str]
    cells: dict[tuple[str, str], Cell]
    split: str
    alpha: float
    skipped: list[str] = field(default_factory=list)  # runs left out, with the reason


def _task(run: Run) -> str:
    return str(flatten(run.config).get("dataset.task", DEFAULT_TASK))


def split_eval(run: Run, split: str) -> EvalRun | None:
    """The run's latest evaluation of `split` with the frames in order."""
    matching = [e for e in run.evals if e.frame_order == "normal" and e.results.get("split") == split]
    return matching[-1] if matching else None


def _pair_with_best(best: Cell, cell: Cell) -> None:
    best_by_seed = {run.seed: e for run, e in zip(best.runs, best.evals, strict=True)}
    pairs = [
        (run.seed, read_predictions(best_by_seed[run.seed].predictions_path), read_predictions(e.predictions_path))
        for run, e in zip(cell.runs, cell.evals, strict=True)
        if run.seed in best_by_seed
    ]
    try:
        cell.versus_best = paired_test(pairs)
    except PairingError as error:
        cell.refused = str(error)


def task_fusion_matrix(runs: Sequence[Run], *, split: str = "test", alpha: float = 0.05) -> Matrix:
    """The matrix of the finished runs evaluated on `split`; the others are listed in `skipped`."""
    grouped: dict[tuple[str, str], list[tuple[Run, EvalRun]]] = {}
    skipped = []
    for run in runs:
        evaluation = split_eval(run, split)
        if run.status != FINISHED or evaluation is None:
            why = run.problem or run.status if run.status != FINISHED else f"no evaluation of split {split}"
            skipped.append(f"{run.path}: {why}")
            continue
        grouped.setdefault((_task(run), str(group_choice(run, "fusion"))), []).append((run, evaluation))
    cells = {}
    for key, members in grouped.items():
        seeds = [run.seed for run, _ in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"task {key[0]}, fusion {key[1]}: two runs share a seed ({seeds}); report them apart")
        evals = [e for _, e in members]
        cells[key] = Cell(
            runs=[run for run, _ in members],
            evals=evals,
            top1=Stat([float(e.results["top1"]) for e in evals]),
            twin_confusion=Stat(
                [float(e.results["twin_confusion"]["confusion"]) for e in evals if _has_twin_confusion(e)]
            ),
        )
    tasks = sorted({task for task, _ in cells})
    fusions = sorted({fusion for _, fusion in cells})
    for task in tasks:
        row = [cells[(task, f)] for f in fusions if (task, f) in cells]
        best = max(row, key=lambda c: c.top1.mean)
        best.is_best = True
        for cell in row:
            if cell is not best:
                _pair_with_best(best, cell)
    return Matrix(tasks=tasks, fusions=fusions, cells=cells, split=split, alpha=alpha, skipped=skipped)


def _has_twin_confusion(evaluation: EvalRun) -> bool:
    twins = evaluation.results.get("twin_confusion")
    return isinstance(twins, dict) and twins.get("confusion") is not None


def _cell_text(cell: Cell | None, alpha: float) -> str:
    if cell is None:
        return "-"
    text = f"{cell.top1.text(1)} (n={cell.top1.n})"
    if cell.is_best:
        return f"**{text}** best"
    if cell.versus_best is None:
        return f"{text} unpaired"
    mark = " ~best" if cell.tied_with_best(alpha) else ""
    return f"{text}{mark} p={cell.versus_best.p_value:.2g}"


def _md_cell(text: str) -> str:
    """A task or fusion name (from the runs' configs) as a table cell: shown as written (`markdown_text`)."""
    return markdown_text(text).replace("|", "\\|")


def matrix_markdown(matrix: Matrix) -> str:
    """The matrix as markdown: top-1 per cell, the best per task in bold, ~best: not significantly different."""
    lines = [
        f"## Temporal benchmark: {matrix.split} top-1 (%), task x fusion",
        "",
        f"Mean ± std over seeds (n runs). **best**: the highest mean of the task; ~best: not significantly "
        f"different from it (exact McNemar on the {matrix.split} videos, pooled over the seeds both have, "
        f"p >= {matrix.alpha}); p: that test's p-value.",
        "",
        "| task | " + " | ".join(map(_md_cell, matrix.fusions)) + " |",
        "|---|" + "---|" * len(matrix.fusions),
    ]
    for task in matrix.tasks:
        cells = [_cell_text(matrix.cells.get((task, f)), matrix.alpha) for f in matrix.fusions]
        lines.append(f"| {_md_cell(task)} | " + " | ".join(cells) + " |")
    if any(c.twin_confusion.n for c in matrix.cells.values()):
        lines += ["", "Twin confusion (%): the share of a twin pair's videos predicted as the other class.", ""]
        header = "| task | " + " | ".join(map(_md_cell, matrix.fusions)) + " |"
        lines += [header, "|---|" + "---|" * len(matrix.fusions)]
        for task in matrix.tasks:
            cells = [matrix.cells.get((task, f)) for f in matrix.fusions]
            texts = [c.twin_confusion.text(1) if c is not None else "-" for c in cells]
            lines.append(f"| {_md_cell(task)} | " + " | ".join(texts) + " |")
    refused = [(k, c.refused) for k, c in matrix.cells.items() if c.refused]
    if refused or matrix.skipped:
        lines += ["", "Left out:"]
        lines += [
            markdown_text(f"- task {task}, fusion {fusion}: not paired with the best: {why}")
            for (task, fusion), why in refused
        ]
        lines += [f"- {markdown_text(line)}" for line in matrix.skipped]
    return "\n".join(lines) + "\n"


def write_matrix_csv(matrix: Matrix, path: Path) -> None:
    rows = [["task", "fusion", "n", "top1_mean", "top1_std", "best", "p_vs_best", "tied_with_best", "twin_confusion"]]
    for (task, fusion), cell in sorted(matrix.cells.items()):
        p_value = cell.versus_best.p_value if cell.versus_best is not None else ""
        rows.append(
            [
                csv_value(task),
                csv_value(fusion),
                cell.top1.n,
                cell.top1.mean,
                "" if cell.top1.std is None else cell.top1.std,
                cell.is_best,
                p_value,
                cell.tied_with_best(matrix.alpha),
                "" if cell.twin_confusion.mean is None else cell.twin_confusion.mean,
            ]
        )
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def plot_matrix(matrix: Matrix, path: Path) -> None:
    """A heat map of mean top-1 per task and fusion; the best per task framed, ties marked with ~."""
    fig = Figure(figsize=(1.6 * len(matrix.fusions) + 2, 0.7 * len(matrix.tasks) + 1.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    values = [
        [cell.top1.mean if (cell := matrix.cells.get((t, f))) is not None else float("nan") for f in matrix.fusions]
        for t in matrix.tasks
    ]
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, task in enumerate(matrix.tasks):
        for j, fusion in enumerate(matrix.fusions):
            cell = matrix.cells.get((task, fusion))
            if cell is None:
                continue
            mark = "\nbest" if cell.is_best else "~" if cell.tied_with_best(matrix.alpha) else ""
            colour = "white" if cell.top1.mean < 60 else "black"
            ax.text(j, i, f"{cell.top1.mean:.1f}{mark}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(len(matrix.fusions)), [plot_text(f) for f in matrix.fusions], rotation=30, ha="right")
    ax.set_yticks(range(len(matrix.tasks)), [plot_text(t) for t in matrix.tasks])
    ax.set_title(f"{matrix.split} top-1 (%), mean over seeds; ~ = not significantly below the best")
    fig.colorbar(image, ax=ax, label="top-1 (%)")
    fig.savefig(path)
