"""Evaluate a model on an eval-split dataset: every video once, its views softmax-averaged, exact under DDP.

`evaluate` is what the trainer (clip-level validation) and the eval app (multi-view test) call;
`predict_shard` and `merge_shards` are its two halves, for callers that run the shards themselves.

Exactness: the eval indices are split across ranks without padding (unlike `DistributedSampler`,
which repeats videos to even out the shards), each rank returns (index, probs, label) for the
videos it decoded and the indices of those it could not, everything is gathered to every rank and
checked to cover each index exactly once. A video that fails to decode is counted, never replaced.

Non-finite outputs: a NaN probability row still has an argmax, so it would count as a prediction of
one class. `check_finite` stops an evaluation with such rows, naming the videos and the likely
cause. It stops rather than counting them as failed videos: those did not decode, while a NaN comes
from damaged inputs (a token cache shard), non-finite weights or an overflow, and a top-1 over the
videos that happened to stay finite would not be comparable with any other evaluation of the split.
(`evaluate` itself does not stop: the trainer's validation keeps such a model from best.pt instead.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from squarefuse.evaluation.inference_loop import BatchSettings, run_batches
from squarefuse.evaluation.metrics import EvalResult, non_finite_rows
from squarefuse.runtime.distributed import all_gather_objects
from squarefuse.runtime.launch_env import DistInfo


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of `range(num_items)`: every `world_size`-th index, no padding.

    Shards differ in length by at most one and together cover every index exactly once, whatever
    `num_items` is (`DistributedSampler` would instead repeat items to make them equal).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(range(rank, num_items, world_size))


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP forwards can start collectives (buffer broadcast); the shards have different lengths,
    # so ranks run different numbers of batches: evaluate the wrapped module directly.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def evaluate(
    model: nn.Module,
    dataset: Any,
    settings: BatchSettings,
    *,
    dist_info: DistInfo,
    progress: bool = False,
) -> EvalResult:
    """Evaluate `model` on an eval-split dataset; every rank returns the same, full result.

    Args:
        model: a `VideoClassifier` (or DDP around one) already on `settings.device`.
        dataset: an eval split from `build_dataset` (`views=True` for the multi-view test): its
            items hold video uint8 [V,T,C,H,W], mask bool [V,T], label, index and failed, and
            `dataset.views` says which (clips, crops) make up the V views.
        settings: device, normaliser, videos per batch, DataLoader workers of this rank,
            precision and frame order (`BatchSettings`).
        dist_info: this process's rank and world size; with world_size > 1 the process group must
            be initialised (results are gathered with `all_gather_objects`).
        progress: show a progress bar on rank 0.

    Returns:
        An `EvalResult` with metrics over the videos that decoded and the failed indices.

    Raises:
        ValueError: the model's outputs do not match the dataset's classes, or no video at all
            could be decoded.
    """
    shard = shard_indices(len(dataset), dist_info.rank, dist_info.world_size)
    part = predict_shard(model, dataset, settings, shard=shard, progress=progress and dist_info.is_main)
    return merge_shards(all_gather_objects(part), num_items=len(dataset), views=dataset.views)


def predict_shard(
    model: nn.Module, dataset: Any, settings: BatchSettings, *, shard: list[int], progress: bool = False
) -> dict[str, Any]:
    """View-averaged probabilities for the dataset indices in `shard` (one rank's share).

    Returns:
        {"indices": int64 [n], "labels": int64 [n], "probs": float32 [n, C]} for the videos that
        decoded, and "failed": the indices of those that did not; all on the CPU.
    """
    num_classes = int(dataset.num_classes)
    model = _unwrap(model)

    def probabilities(video: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(video, mask)
        if logits.shape[-1] != num_classes:
            raise ValueError(f"the model has {logits.shape[-1]} outputs but the dataset has {num_classes} classes")
        # Softmax per view in fp32; run_batches then takes the mean over the V views of each video.
        return {"probs": logits.float().softmax(dim=-1)}

    # Restore each module's own mode afterwards: model.train() would also flip sub-modules the
    # trainer keeps in eval mode on purpose (e.g. a frozen backbone).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        out = run_batches(probabilities, dataset, settings, shard=shard, progress=progress, desc="eval")
    finally:
        for m, mode in modes:
            m.training = mode
    return {
        "indices": out["indices"],
        "labels": out["labels"],
        "probs": out["outputs"].get("probs", torch.zeros(0, num_classes)),
        "failed": list(out["errors"]),
    }


def merge_shards(parts: list[dict[str, Any]], *, num_items: int, views: tuple[int, int]) -> EvalResult:
    """Concatenate the ranks' `predict_shard` outputs, check each index appears exactly once,
    and compute the metrics; `views` (clips, crops) is reported in the result."""
    indices = torch.cat([p["indices"] for p in parts])
    failed = sorted(i for p in parts for i in p["failed"])
    seen = indices.tolist() + failed
    assert len(seen) == num_items and set(seen) == set(range(num_items)), (
        f"eval shards do not cover the {num_items} videos exactly once ({len(seen)} results, {len(set(seen))} distinct)"
    )
    order = indices.argsort()
    indices = indices[order]
    labels = torch.cat([p["labels"] for p in parts])[order]
    probs = torch.cat([p["probs"] for p in parts])[order]
    if indices.numel() == 0:
        raise ValueError(
            f"none of the {num_items} eval videos could be decoded ({len(failed)} failed): "
            "check dataset.root and dataset.decoder"
        )
    return EvalResult(
        num_videos=indices.numel(),
        num_failed=len(failed),
        views=(int(views[0]), int(views[1])),
        indices=indices,
        labels=labels,
        probs=probs,
        failed_indices=failed,
    )


def name_videos(names: Sequence[str], *, first: int = 5) -> str:
    """ "a, b, c" or "a, b, c, d, e and 7 more": the first videos of a list, for a message."""
    more = f" and {len(names) - first} more" if len(names) > first else ""
    return ", ".join(names[:first]) + more


def check_finite(result: EvalResult, dataset: Any, model: nn.Module) -> None:
    """Raise when some videos' probabilities are NaN or infinite: they cannot be scored (see the module docstring).

    The message names the first videos and what made their outputs non-finite: inputs holding NaN
    (checked for a model on cached tokens; video pixels are uint8), weights holding NaN, or else
    an overflow in the forward.

    Raises:
        ValueError: some rows of `result.probs` are not finite.
    """
    rows = non_finite_rows(result.probs)
    if not rows:
        return
    indices = [int(result.indices[row]) for row in rows]
    records = getattr(dataset, "records", None)
    names = [f"{records[i].path} (index {i})" if records is not None else f"index {i}" for i in indices]
    on_tokens = getattr(_unwrap(model), "mean", 0) is None  # a model on cached tokens has no pixel mean
    bad_inputs = [
        name
        for i, name in zip(indices[:5], names, strict=False)
        if on_tokens and not torch.isfinite(dataset[i]["video"].float()).all()
    ]
    weights = model.state_dict().items()
    bad_weight = next((k for k, v in weights if v.is_floating_point() and not v.isfinite().all()), None)
    if bad_inputs:
        cause = (
            f"The inputs of {name_videos(bad_inputs)} hold NaN or infinite values: the data is damaged, not the "
            "model (a token cache: make the cache of this split again with scripts/cache_tokens.py)."
        )
    elif bad_weight is not None:
        cause = f"The model's weights hold NaN or infinite values ({bad_weight}): evaluate another checkpoint."
    else:
        cause = "Inputs and weights are finite: the forward overflowed; evaluate with precision=fp32 (or bf16)."
    raise ValueError(
        f"the model's outputs are NaN or infinite for {len(rows)} of {result.num_videos} videos: "
        f"{name_videos(names)}. They are not scored (a NaN still has an argmax, which would count as a prediction). "
        + cause
    )
