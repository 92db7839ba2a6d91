"""The report's PNG figures, drawn on bare matplotlib `Figure`s (Agg canvas, no display, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from squarefuse.report.aggregate import GroupSummary, per_class_accuracy, seed_pairs
from squarefuse.runtime.safe_text import plot_text

_MAX_CLASS_LABELS = 40  # beyond this, class names on an axis overlap into an unreadable block


def _mean_and_band(ax, curves: Sequence[Sequence[tuple[int, float]]], label: str) -> bool:
    """Plot the mean over runs of (x, y) curves with their min-max band; markers show single points."""
    by_x: dict[int, list[float]] = {}
    for curve in curves:
        for x, y in curve:
            by_x.setdefault(x, []).append(y)
    if not by_x:
        return False
    xs = sorted(by_x)
    mean = [sum(by_x[x]) / len(by_x[x]) for x in xs]
    (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=plot_text(label))
    ax.fill_between(xs, [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs], color=line.get_color(), alpha=0.2)
    return True


def plot_training_curves(summaries: Sequence[GroupSummary], path: Path) -> bool:
    """Save `training_curves_figure` to `path`; False when no finished run logged anything to draw."""
    fig = training_curves_figure(summaries)
    if fig is None:
        return False
    fig.savefig(path)
    return True


def training_curves_figure(summaries: Sequence[GroupSummary]) -> Figure | None:
    """Train loss per step next to clip-level val top-1 per epoch: the mean over a group's finished runs,
    min-max band over seeds."""
    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    loss_ax, val_ax = fig.subplots(1, 2)
    drawn = False
    for summary in summaries:
        label = f"{summary.label} (n={len(summary.finished)})"
        # The same colour for a group in both panels: matplotlib's cycle advances per line drawn.
        drawn_loss = _mean_and_band(loss_ax, [run.train_curve for run in summary.finished], label)
        if not drawn_loss:
            loss_ax.plot([], [])
        drawn_val = _mean_and_band(val_ax, [run.val_curve for run in summary.finished], label)
        if not drawn_val:
            val_ax.plot([], [])
        drawn = drawn or drawn_loss or drawn_val
    if not drawn:
        return None
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("train loss")
    loss_ax.set_title("train loss: mean over seeds, band = min-max")
    val_ax.set_xlabel("epoch")
    val_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    val_ax.set_ylabel("clip-level val top-1 (%)")
    val_ax.set_title("validation top-1: mean over seeds, band = min-max")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        if any(not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=8)
    return fig


def why_no_accuracy_vs_flops(summaries: Sequence[GroupSummary]) -> str:
    """Why `plot_accuracy_vs_flops` has nothing to draw, in the user's terms."""
    with_flops = [s for s in summaries if s.fusion_flops is not None]
    evaluated = [s for s in summaries if s.eval_top1.mean is not None]
    if not evaluated:
        return "no run was evaluated yet (python eval.py ckpt=<run>/checkpoints/best.pt)"
    if not with_flops:
        return "no run folder has a model_info.json with fusion FLOPs (train.py writes it at start-up)"
    return "no group has both an evaluation and model_info.json FLOPs"


def plot_accuracy_vs_flops(summaries: Sequence[GroupSummary], path: Path) -> bool:
    """Eval top-1 (mean ± std over seeds) against the fusion's FLOPs per clip; False when no
    group has both (`why_no_accuracy_vs_flops` says which is missing)."""
    points = [s for s in summaries if s.fusion_flops is not None and s.eval_top1.mean is not None]
    if not points:
        return False
    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for s in points:
        gflops = s.fusion_flops / 1e9
        ax.errorbar(gflops, s.eval_top1.mean, yerr=s.eval_top1.std or 0.0, fmt="o", capsize=4, label=plot_text(s.label))
        ax.annotate(
            plot_text(s.label), (gflops, s.eval_top1.mean), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    ax.set_xlabel("fusion GFLOPs per clip")
    ax.set_ylabel("multi-view eval top-1 (%)")
    ax.set_title("accuracy against the fusion's cost (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return True


def plot_per_class_gain(summaries: Sequence[GroupSummary], path: Path) -> bool:
    """Per-class eval top-1 of each group minus its baseline's, over the seeds both evaluated."""
    rows = []
    for s in summaries:
        if s.comparison is None or s.comparison.test is None:
            continue
        baseline = next(b for b in summaries if b.group is s.comparison.baseline)
        pairs = seed_pairs(baseline, s)
        base_acc = per_class_accuracy([b for _, b, _ in pairs])
        acc = per_class_accuracy([o for _, _, o in pairs])
        rows.append((s.label, baseline.label, {c: acc[c] - base_acc[c] for c in base_acc}))
    if not rows:
        return False
    classes = sorted(rows[0][2])
    fig = Figure(figsize=(max(8.0, 0.3 * len(classes) + 3), 2.5 + 2.5 * len(rows)), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (label, base_label, gain) in zip(axes, rows, strict=True):
        values = [gain.get(c, 0.0) for c in classes]
        ax.bar(range(len(classes)), values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylabel("top-1 gain (points)")
        ax.set_title(plot_text(f"{label} minus {base_label}"), fontsize=9)
        if len(classes) <= _MAX_CLASS_LABELS:
            ax.set_xticks(range(len(classes)), labels=[plot_text(c) for c in classes], rotation=90, fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"{len(classes)} classes")
    fig.savefig(path)
    return True
