"""The temporal benchmark's verdict: a task x option matrix of test top-1, compared a reviewer's way.

Rows are the synthetic task (`dataset.task`; a run without the key is the default ``direction``),
columns the option: the fusion's Hydra choice, with the head's (`square/attentive`) where the runs use
more than one head. A cell holds the finished runs of that task and option evaluated on `split`
(frames in order), one per seed: mean ± std of their top-1 and, where it is not just 100 - top-1, of
their twin confusion.

The comparisons are fixed before any number is seen: the `reference` option (`square`, with the same
head) against every other option of the same task, nothing chosen on the test split. Seeds are the
unit: the difference of mean top-1, a 95 % bootstrap interval over seeds and test videos, Welch's
t-test over the per-seed top-1, Holm's correction over every comparison of the matrix. A comparison
reads `better`/`worse` (for the other option) only below `alpha` after Holm, and `tie` only when the
interval lies inside +-`margin` points (an equivalence test); anything else is `inconclusive`.

Two columns are positive controls, not options (DESIGN.md section 9): the token control `joint_mlp`
(an MLP over all the cached tokens of a clip) and the pixel control `pixels+joint_mlp` (the same on
the downsampled frames, `groups.fusion_option`). They are not compared with the reference and are
not in Holm's family. A task is **informative** only where its token control reaches a mean test
top-1 of `INFORMATIVE_TOP1` (with several heads: in at least one); elsewhere nothing shows that the
tokens carry the answer, the row is marked, and no fusion verdict is read from it.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from squarefuse.report.aggregate import Stat
from squarefuse.report.groups import benchmark_option, benchmark_task, group_choice
from squarefuse.report.runs import FINISHED, EvalRun, Run, read_predictions
from squarefuse.report.significance import PairingError, SeedComparison, compare_over_seeds, holm
from squarefuse.runtime.safe_text import csv_value, markdown_text, plot_text

__all__ = ["Cell", "Matrix", "plot_matrix", "task_fusion_matrix", "write_matrix_csv", "matrix_markdown"]

REFERENCE = "square"
MARGIN = 2.0  # points of top-1: a tie is claimed only when the difference's interval lies inside +-MARGIN
TOKEN_CONTROL = "joint_mlp"  # the fusion whose run on the tokens is the token control
PIXEL_CONTROL = f"pixels+{TOKEN_CONTROL}"  # its run on the downsampled frames (backbone=pixels)
INFORMATIVE_TOP1 = 90.0  # % mean test top-1 of the token control for a task to be informative


@dataclass
class Cell:
    """The runs of one task and option evaluated on the split, and how they compare with the reference."""

    runs: list[Run]
    evals: list[EvalRun]
    top1: Stat
    twin_confusion: Stat
    is_reference: bool = False
    versus_reference: SeedComparison | None = None  # this option minus the reference
    refused: str | None = None  # why the cell could not be compared with the reference
    control: str | None = None  # "token control" or "pixel control": a positive control, never compared

    def verdict(self, alpha: float, margin: float = MARGIN) -> str:
        if self.is_reference:
            return "reference"
        if self.control is not None:
            return "control"
        return self.versus_reference.verdict(alpha, margin) if self.versus_reference is not None else "-"


@dataclass
class Matrix:
    tasks: list[str]
    fusions: list[str]  # the options (columns)
    cells: dict[tuple[str, str], Cell]
    split: str
    alpha: float
    reference: str = REFERENCE
    margin: float = MARGIN
    skipped: list[str] = field(default_factory=list)  # runs left out, with the reason

    def token_control_top1(self, task: str) -> float | None:
        """The task's token-control mean test top-1 (with several heads, the highest); None without one."""
        means = [c.top1.mean for (t, _), c in self.cells.items() if t == task and c.control == "token control"]
        return max(means) if means else None

    def informative(self, task: str) -> bool:
        """Whether the task's token control reaches `INFORMATIVE_TOP1`: only then is a fusion verdict read."""
        top1 = self.token_control_top1(task)
        return top1 is not None and top1 >= INFORMATIVE_TOP1

    def informative_text(self, task: str) -> str:
        top1 = self.token_control_top1(task)
        if top1 is None:
            return "no: no token control ran"
        if top1 < INFORMATIVE_TOP1:
            return f"no: token control {top1:.1f} < {INFORMATIVE_TOP1:g}"
        return f"yes: token control {top1:.1f}"

    def shows_twin_confusion(self, task: str) -> bool:
        """Whether the task's twin confusion says more than its top-1: not where, in every run, it is
        100 - top-1 (a two-class task whose two classes are the twins)."""
        cells = [c for (t, _), c in self.cells.items() if t == task and c.twin_confusion.n]
        return any(
            abs(twin + top1 - 100) > 1e-6
            for c in cells
            for twin, top1 in zip(c.twin_confusion.values, c.top1.values, strict=False)
        )


def _control(option: str) -> str | None:
    """The kind of a control column (any head): "token control" or "pixel control"; None for an option compared."""
    fusion = option.split("/", 1)[0]
    return {TOKEN_CONTROL: "token control", PIXEL_CONTROL: "pixel control"}.get(fusion)


def _reference_of(option: str, reference: str) -> str:
    """The reference option with the same head as `option` (`temporal_attn/mean` -> `square/mean`)."""
    return f"{reference}/{option.split('/', 1)[1]}" if "/" in option else reference


def _compare(reference: Cell, cell: Cell) -> None:
    by_seed = {run.seed: e for run, e in zip(reference.runs, reference.evals, strict=True)}
    seeds = [run.seed for run in cell.runs]
    if set(seeds) != set(by_seed):
        cell.refused = f"seeds {sorted(seeds)} here, {sorted(by_seed)} in the reference: run the same seeds"
        return
    try:
        cell.versus_reference = compare_over_seeds(
            [read_predictions(by_seed[s].predictions_path) for s in seeds],
            [read_predictions(e.predictions_path) for e in cell.evals],
        )
    except PairingError as error:
        cell.refused = str(error)


def task_fusion_matrix(
    runs: Sequence[Run], *, split: str = "test", alpha: float = 0.05, reference: str = REFERENCE
) -> Matrix:
    """The matrix of the finished runs evaluated on `split`; the others are listed in `skipped`."""
    chosen: list[tuple[Run, EvalRun]] = []
    skipped = []
    for run in runs:
        evaluation = run.split_eval(split)
        if run.status != FINISHED or evaluation is None:
            why = run.problem or run.status if run.status != FINISHED else f"no evaluation of split {split}"
            skipped.append(f"{run.path}: {why}")
            continue
        chosen.append((run, evaluation))
    heads = {str(group_choice(run, "head")) for run, _ in chosen}
    grouped: dict[tuple[str, str], list[tuple[Run, EvalRun]]] = {}
    for run, evaluation in chosen:
        grouped.setdefault((benchmark_task(run), benchmark_option(run, heads)), []).append((run, evaluation))
    cells = {}
    for key, members in grouped.items():
        seeds = [run.seed for run, _ in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"task {key[0]}, option {key[1]}: two runs share a seed ({seeds}); report them apart")
        evals = [e for _, e in members]
        top1 = [float(e.results["top1"]) for e in evals]
        twins = [float(e.results["twin_confusion"]["confusion"]) for e in evals if _has_twin_confusion(e)]
        cells[key] = Cell(
            runs=[run for run, _ in members],
            evals=evals,
            top1=Stat(top1),
            twin_confusion=Stat(twins),
            control=_control(key[1]),
        )
    compared = []
    for (task, option), cell in cells.items():
        ref = cells.get((task, _reference_of(option, reference)))
        if cell.control is not None:
            continue  # a positive control: it gates the task, it is not an option compared (nor in Holm's family)
        if ref is cell:
            cell.is_reference = True
        elif ref is None:
            cell.refused = f"no {_reference_of(option, reference)} runs of this task to compare with"
        else:
            _compare(ref, cell)
            compared += [cell] if cell.versus_reference is not None else []
    tested = [c for c in compared if c.versus_reference.p_value is not None]
    for cell, p_holm in zip(tested, holm([c.versus_reference.p_value for c in tested]), strict=True):
        cell.versus_reference.p_holm = p_holm
    tasks = sorted({task for task, _ in cells})
    # The controls last: they frame the options, they are not among them.
    fusions = sorted({option for _, option in cells}, key=lambda option: (_control(option) is not None, option))
    return Matrix(tasks, fusions, cells, split, alpha, reference=reference, skipped=skipped)


def _has_twin_confusion(evaluation: EvalRun) -> bool:
    twins = evaluation.results.get("twin_confusion")
    return isinstance(twins, dict) and twins.get("confusion") is not None


def _cell_text(cell: Cell | None, matrix: Matrix) -> str:
    if cell is None:
        return "-"
    text = f"{cell.top1.text(1)} (n={cell.top1.n})"
    if cell.is_reference:
        return f"**{text}** ref"
    if cell.control is not None:
        return f"{text} {cell.control}"
    c = cell.versus_reference
    if c is None:
        return f"{text} not compared"
    p = "p_Holm -" if c.p_holm is None else f"p_Holm={c.p_holm:.2g}"
    return (
        f"{text} Δ{c.difference:+.1f} [{c.ci[0]:+.1f}, {c.ci[1]:+.1f}] {p} {cell.verdict(matrix.alpha, matrix.margin)}"
    )


def _md_cell(text: str) -> str:
    """A task or fusion name (from the runs' configs) as a table cell: shown as written (`markdown_text`)."""
    return markdown_text(text).replace("|", "\\|")


def matrix_markdown(matrix: Matrix) -> str:
    """The matrix as markdown: top-1 per cell and each option's comparison with the reference."""
    lines = [
        f"## Temporal benchmark: {matrix.split} top-1 (%), task x option",
        "",
        f"Mean ± std over seeds (n runs); **ref**: the reference `{matrix.reference}`, fixed in advance. "
        "Other cells: Δ = this option minus the reference (points), its 95 % bootstrap interval over seeds "
        "and test videos, Welch's t-test over the per-seed top-1 with Holm's correction over every "
        f"comparison of the matrix; better/worse: p_Holm below {matrix.alpha}; tie: the interval inside "
        f"±{matrix.margin:g} points; else inconclusive. No cell is chosen on the {matrix.split} split.",
        "",
        f"Positive controls, not compared (nor in Holm's family): `{TOKEN_CONTROL}` (token control: an MLP "
        f"over all the cached tokens of a clip) and `{PIXEL_CONTROL}` (pixel control: the same on each frame's "
        "pixels averaged down to a small grid, backbone=pixels). A task is informative only where its token "
        f"control reaches {INFORMATIVE_TOP1:g} % mean {matrix.split} top-1 (last column); in the rows marked "
        "**no** nothing shows that the tokens carry the answer, and **no fusion verdict is read from them**.",
        "",
        "| task | " + " | ".join(map(_md_cell, matrix.fusions)) + " | informative |",
        "|---|" + "---|" * (len(matrix.fusions) + 1),
    ]
    for task in matrix.tasks:
        cells = [_cell_text(matrix.cells.get((task, f)), matrix) for f in matrix.fusions]
        gate = matrix.informative_text(task)
        gate = gate if matrix.informative(task) else f"**{gate}**"
        lines.append(f"| {_md_cell(task)} | " + " | ".join(cells) + f" | {gate} |")
    twin_tasks = [task for task in matrix.tasks if matrix.shows_twin_confusion(task)]
    if twin_tasks:
        lines += ["", "Twin confusion (%): the share of a twin pair's videos predicted as the other class", ""]
        lines[-2] += " (not shown where it is 100 - top-1: two-class tasks whose classes are the twins)."
        header = "| task | " + " | ".join(map(_md_cell, matrix.fusions)) + " |"
        lines += [header, "|---|" + "---|" * len(matrix.fusions)]
        for task in twin_tasks:
            cells = [matrix.cells.get((task, f)) for f in matrix.fusions]
            texts = [c.twin_confusion.text(1) if c is not None else "-" for c in cells]
            lines.append(f"| {_md_cell(task)} | " + " | ".join(texts) + " |")
    refused = [(k, c.refused) for k, c in matrix.cells.items() if c.refused]
    if refused or matrix.skipped:
        lines += ["", "Left out:"]
        lines += [
            markdown_text(f"- task {task}, option {option}: not compared: {why}") for (task, option), why in refused
        ]
        lines += [f"- {markdown_text(line)}" for line in matrix.skipped]
    return "\n".join(lines) + "\n"


def write_matrix_csv(matrix: Matrix, path: Path) -> None:
    rows = [
        ["task", "option", "n", "top1_mean", "top1_std", "diff_vs_reference", "ci_low", "ci_high"]
        + ["p_welch", "p_holm", "verdict", "twin_confusion", "task_informative"]
    ]
    for (task, option), cell in sorted(matrix.cells.items()):
        c = cell.versus_reference
        blank = ["", "", "", "", ""]
        compared = [c.difference, c.ci[0], c.ci[1], c.p_value, c.p_holm] if c is not None else blank
        rows.append(
            [
                csv_value(task),
                csv_value(option),
                cell.top1.n,
                cell.top1.mean,
                "" if cell.top1.std is None else cell.top1.std,
            ]
            + ["" if v is None else v for v in compared]
            + [
                cell.verdict(matrix.alpha, matrix.margin),
                cell.twin_confusion.mean if matrix.shows_twin_confusion(task) else "",
                matrix.informative_text(task),
            ]
        )
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def plot_matrix(matrix: Matrix, path: Path) -> None:
    """A heat map of mean top-1 per task and option, each cell marked by its verdict against the reference."""
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
            verdict = cell.verdict(matrix.alpha, matrix.margin)
            marks = {"reference": "\nref", "better": "\n+", "worse": "\n-", "tie": "\n=", "control": "\ncontrol"}
            mark = marks.get(verdict, "")
            colour = "white" if cell.top1.mean < 60 else "black"
            ax.text(j, i, f"{cell.top1.mean:.1f}{mark}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(len(matrix.fusions)), [plot_text(f) for f in matrix.fusions], rotation=30, ha="right")
    # A task whose token control stays below INFORMATIVE_TOP1: its row is labelled and hatched over.
    labels = [plot_text(t) if matrix.informative(t) else f"{plot_text(t)}\nNOT INFORMATIVE" for t in matrix.tasks]
    ax.set_yticks(range(len(matrix.tasks)), labels)
    for i, task in enumerate(matrix.tasks):
        if not matrix.informative(task):
            ax.get_yticklabels()[i].set_color("red")
            ax.axhspan(i - 0.5, i + 0.5, fill=False, hatch="//", edgecolor="red", linewidth=0)
    ax.set_title(
        f"{matrix.split} top-1 (%), mean over seeds; vs {matrix.reference}: + better, - worse, = tie\n"
        f"NOT INFORMATIVE: token control ({TOKEN_CONTROL}) < {INFORMATIVE_TOP1:g} %, no fusion verdict read"
    )
    fig.colorbar(image, ax=ax, label="top-1 (%)")
    fig.savefig(path)
