"""Classification metrics of an evaluation: top-1, top-k, mean-class accuracy, confusion matrix.

`EvalResult` holds the numbers and the per-video predictions behind them; `compute_metrics` turns
view-averaged probabilities into the numbers. Nothing here knows about models, datasets or ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

TOPK = 5  # the k of the `top5` number (at most the number of classes)


def top5_name(k: int) -> str:
    """How logs name the `top5` number: "top5", or "top5 (k=3: 3 classes)" when there are fewer than 5.

    One name everywhere (results.json, metrics.jsonl, per_class.csv, predictions.csv, logs, report):
    `top5`, with `topk` stating k where it is less than 5.
    """
    return "top5" if k >= TOPK else f"top5 (k={k}: {k} classes)"


@dataclass
class EvalResult:
    """Metrics over the videos that decoded, and the per-video predictions behind them.

    Accuracies are in percent. `indices`, `labels` and `probs` hold one row per evaluated video,
    sorted by dataset index; `probs` is the softmax averaged over the clips x crops views.
    """

    top1: float
    top5: float
    mean_class_acc: float
    loss: float
    num_videos: int
    num_failed: int
    views: tuple[int, int]
    indices: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor
    failed_indices: list[int] = field(default_factory=list)

    @property
    def topk(self) -> int:
        """The k of the `top5` number: min(5, number of classes)."""
        return min(TOPK, self.probs.shape[1])


def non_finite_rows(probs: torch.Tensor) -> list[int]:
    """The rows of `probs` [N, C] that hold a NaN or an infinity."""
    return (~torch.isfinite(probs).all(dim=1)).nonzero().flatten().tolist()


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts; row = true class, column = predicted class."""
    if labels.numel() == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.long)
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


def compute_metrics(labels: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
    """top1, top5 (top-k with k = min(5, classes)), mean_class_acc (percent) and the NLL loss.

    Args:
        labels: int64 [N] true classes.
        probs: float [N, C] class probabilities (rows sum to 1).
    """
    num_classes = probs.shape[1]
    topk = probs.topk(min(TOPK, num_classes), dim=1).indices
    preds = topk[:, 0]
    top1 = 100.0 * (preds == labels).double().mean().item()
    top5 = 100.0 * (topk == labels[:, None]).any(dim=1).double().mean().item()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    mca = mean_class_accuracy(confusion_matrix(labels, preds, num_classes))
    return {"top1": top1, "top5": top5, "mean_class_acc": mca, "loss": loss}
