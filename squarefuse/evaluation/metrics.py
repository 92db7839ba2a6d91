"""Classification metrics of an evaluation, defined once in the `METRICS` registry.

`Scores` is what every metric is computed from, computed once per evaluation: the labels, the
view-averaged probabilities, their top-k classes and the confusion matrix. A `Metric` is one
number computed from it, with how it is printed and whether higher is better. `EvalResult` holds
the per-video predictions and the value of every registered metric.

To add a metric, add a `Metric` to `METRICS`: the trainer's `val_clip` records (metrics.jsonl),
eval's results.json and summary line, and the report's per-group mean ± std columns (report.md,
report.csv) iterate over the registry. Nothing here knows about models, datasets or ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: the report reads the registry without it
    import torch

TOPK = 5  # the k of the top-k accuracy (at most the number of classes)


@dataclass(frozen=True)
class Scores:
    """The predictions of N videos over C classes, and what the metrics and result files share.

    labels: int64 [N] true classes; probs: float [N, C] class probabilities (rows sum to 1);
    topk_probs / topk_ids: [N, k] the k = min(5, C) most probable classes, most probable first;
    confmat: int64 [C, C] counts, row = true class, column = predicted (top-1) class.
    """

    labels: torch.Tensor
    probs: torch.Tensor
    topk_probs: torch.Tensor
    topk_ids: torch.Tensor
    confmat: torch.Tensor

    @property
    def k(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def preds(self) -> torch.Tensor:
        """int64 [N] the top-1 class of each video."""
        return self.topk_ids[:, 0]

    @property
    def topk_hits(self) -> torch.Tensor:
        """bool [N] whether the true class is among the top k."""
        return (self.topk_ids == self.labels[:, None]).any(dim=1)


def scores(labels: torch.Tensor, probs: torch.Tensor) -> Scores:
    """Top-k classes and confusion matrix of `probs` [N, C] against `labels` [N]."""
    num_classes = probs.shape[1]
    topk_probs, topk_ids = probs.topk(min(TOPK, num_classes), dim=1)
    confmat = confusion_matrix(labels, topk_ids[:, 0], num_classes)
    return Scores(labels=labels, probs=probs, topk_probs=topk_probs, topk_ids=topk_ids, confmat=confmat)


@dataclass(frozen=True)
class Metric:
    """One number of an evaluation.

    name: its key in results.json and the `val_clip` records of metrics.jsonl, and `eval_<name>_*`
        in report.csv.
    title: how logs and report.md name it; "{k}" becomes top-k's k ("top-{k}": "top-5", or "top-3"
        with 3 classes; "top-k" in the report, whose runs may differ in k).
    compute: its value from the `Scores` of the evaluated videos.
    unit, digits: printed as f"{value:.{digits}f}{unit}".
    higher_is_better: False for a loss or an error rate (the report says so).
    old_names: keys that runs written before a rename used (the report still reads them).
    """

    name: str
    title: str
    compute: Callable[[Scores], float]
    unit: str = "%"
    digits: int = 2
    higher_is_better: bool = True
    old_names: tuple[str, ...] = ()

    def label(self, k: int | str = "k") -> str:
        return self.title.replace("{k}", str(k))

    def text(self, value: float) -> str:
        return f"{value:.{self.digits}f}{self.unit}"

    def read(self, record: Mapping[str, object]) -> float | None:
        """Its value in a results.json or metrics.jsonl record (under `name` or an old name), else None."""
        for key in (self.name, *self.old_names):
            if record.get(key) is not None:
                return float(record[key])  # type: ignore[arg-type]
        return None


def non_finite_rows(probs: torch.Tensor) -> list[int]:
    """The rows of `probs` [N, C] that hold a NaN or an infinity."""
    return (~probs.isfinite().all(dim=1)).nonzero().flatten().tolist()


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts; row = true class, column = predicted class."""
    if labels.numel() == 0:
        return labels.new_zeros(num_classes, num_classes)
    # Lazy: importing torchmetrics loads all of its domains (audio's scipy.signal too), ~3.5 s on
    # 2 cores; a command that stops on a bad argument, or never evaluates, should not wait for it.
    from torchmetrics.functional.classification import multiclass_confusion_matrix  # noqa: PLC0415

    return multiclass_confusion_matrix(preds, labels, num_classes=num_classes, validate_args=False).long()


def mean_class_accuracy(confmat: torch.Tensor) -> float:
    """Mean over the classes present in the eval set of their recall, in percent.

    Classes with no video are left out of the mean (as in MMAction2 / VideoMAE): torchmetrics'
    macro accuracy would count a class that has no video but is predicted as 0% instead.
    """
    support = confmat.sum(dim=1)
    present = support > 0
    if not present.any():
        return float("nan")
    recall = confmat.diagonal()[present].double() / support[present].double()
    return 100.0 * recall.mean().item()


def _percent(hits: torch.Tensor) -> float:
    return 100.0 * hits.double().mean().item()


def _nll(s: Scores) -> float:
    # The clamp keeps a probability of exactly 0 for the true class a large, finite loss.
    import torch.nn.functional as F  # noqa: PLC0415 - lazy: see the note on TYPE_CHECKING above

    return F.nll_loss(s.probs.clamp_min(1e-12).log(), s.labels).item()


# The registry: name -> Metric, in the order logs, results.json and the report list them.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("top1", "top-1", lambda s: _percent(s.preds == s.labels)),
        Metric("topk_acc", "top-{k}", lambda s: _percent(s.topk_hits), old_names=("top5",)),
        Metric("mean_class_acc", "mean-class", lambda s: mean_class_accuracy(s.confmat)),
        Metric("loss", "loss", _nll, unit="", digits=4, higher_is_better=False),
    )
}


def compute_metrics(s: Scores) -> dict[str, float]:
    """The value of every registered metric, by name."""
    return {name: float(metric.compute(s)) for name, metric in METRICS.items()}


@dataclass
class EvalResult:
    """The per-video predictions of an evaluation and its metrics, computed from them on creation.

    `indices`, `labels` and `probs` hold one row per evaluated video, sorted by dataset index;
    `probs` is the softmax averaged over the clips x crops views. `scores` (top-k, confusion
    matrix) and `metrics` (name -> value of every `METRICS` entry; accuracies in percent) are
    computed once here, and every result file and log line reads them.
    """

    num_videos: int
    num_failed: int
    views: tuple[int, int]
    indices: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor
    failed_indices: list[int] = field(default_factory=list)
    scores: Scores = field(init=False, repr=False)
    metrics: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.scores = scores(self.labels, self.probs)
        self.metrics = compute_metrics(self.scores)

    @property
    def topk(self) -> int:
        """The k of the top-k accuracy: min(5, number of classes)."""
        return self.scores.k

    # The metrics the trainer and the apps decide on, typed.
    @property
    def top1(self) -> float:
        return self.metrics["top1"]

    @property
    def topk_acc(self) -> float:
        return self.metrics["topk_acc"]

    @property
    def mean_class_acc(self) -> float:
        return self.metrics["mean_class_acc"]

    @property
    def loss(self) -> float:
        return self.metrics["loss"]

    def metrics_text(self) -> str:
        """ "top-1: 80.00%  top-5: 95.00%  mean-class: 79.50%  loss: 0.6931": every metric, for a log line."""
        return "  ".join(f"{m.label(self.topk)}: {m.text(self.metrics[n])}" for n, m in METRICS.items())
