"""The report's PNG figures, drawn on bare matplotlib `Figure`s (Agg canvas, no display, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from squarefuse.report.aggregate import GroupSummary, per_class_accuracy, seed_pairs
from squarefuse.runtime.safe_text import plot_text

_MAX_CLASS_LABELS = 40  # beyond this, class names on an axis overlap into an unreadable block


def plot_val_curves(summaries: Sequence[GroupSummary], path: Path) -> bool:
    """Clip-level val top-1 per epoch: the mean over a group's finished runs, min-max band over seeds."""
    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    for summary in summaries:
        by_epoch: dict[int, list[float]] = {}
        for run in summary.finished:
            for epoch, top1 in run.val_curve:
                by_epoch.setdefault(epoch, []).append(top1)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        mean = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        (line,) = ax.plot(epochs, mean, label=plot_text(f"{summary.label} (n={len(summary.finished)})"))
        ax.fill_between(
            epochs,
            [min(by_epoch[e]) for e in epochs],
            [max(by_epoch[e]) for e in epochs],
            color=line.get_color(),
            alpha=0.2,
        )
        drawn = True
    if not drawn:
        return False
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("clip-level val top-1 (%)")
    ax.set_title("validation top-1: mean over seeds, band = min-max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def plot_accuracy_vs_flops(summaries: Sequence[GroupSummary], path: Path) -> bool:
    """Eval top-1 (mean ± std over seeds) against the fusion's FLOPs per clip; False when no
    group has both (model_info.json missing, or no evaluation)."""
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
