"""The batch loop over eval items shared by eval, predict and extract.

Eval items (`VideoDataset` eval mode) hold every view of a video, [V,T,C,H,W] uint8; `run_batches`
loads them with a DataLoader over a given list of indices (one rank's shard, no padding),
normalises on the device, runs a model function on the B*V views and averages its outputs over
each video's V views. Videos that fail to decode are collected with their error, never replaced.
A worker that dies, or a batch that takes longer than `BatchSettings.loader_timeout`, ends the run
with `LoaderStalled` naming the batch's videos: nothing waits on a stuck worker for ever.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from squarefuse.datasets.preprocess import VideoNormalizer
from squarefuse.evaluation.frame_order import reorder_frames
from squarefuse.runtime.precision import autocast
from squarefuse.runtime.workers import bounded_batches, ignore_stop_signals, private_generator

__all__ = ["DEFAULT_LOADER_TIMEOUT_S", "BatchSettings", "run_batches"]

# Seconds the batch loop waits for one batch from its workers (`loader_timeout` in the app configs).
# Generous: a batch of videos whose decoders all hang takes batch_size x (decoders tried) x
# dataset.decode_timeout before the guard has failed them all, and a loaded node is slow.
DEFAULT_LOADER_TIMEOUT_S = 1800.0
_ADVICE = (
    "Run with num_workers=0 to load in this process (a crash or hang then shows where it is), "
    "set dataset.decode_timeout=60 to decode in a guarded process that is killed when it hangs, or "
    "raise loader_timeout=SECONDS if the videos are only slow to load"
)


@dataclass(frozen=True)
class BatchSettings:
    """How the videos are run, the same for evaluation, prediction and feature extraction.

    Attributes:
        device: where the forward runs.
        normalizer: uint8 -> normalised float, on `device`.
        batch_size: videos per batch (each brings its V = clips x crops views).
        num_workers: DataLoader workers (of this rank).
        precision: fp32 | bf16 | fp16 (autocast).
        frame_order: normal | reversed | shuffled: the frames of every view reordered before the
            model sees them (`squarefuse.evaluation.frame_order`); frame_order_seed seeds the shuffle.
        loader_timeout: seconds to wait for one batch from the workers (> 0; unused without workers).
    """

    device: torch.device
    normalizer: VideoNormalizer
    batch_size: int
    num_workers: int
    precision: str
    frame_order: str = "normal"
    frame_order_seed: int = 0
    loader_timeout: float = DEFAULT_LOADER_TIMEOUT_S


def run_batches(
    fn: Callable[[Tensor, Tensor], dict[str, Tensor]],
    dataset: Any,
    settings: BatchSettings,
    *,
    shard: Sequence[int],
    progress: bool = False,
    desc: str = "videos",
    num_views: int | None = None,
    average_views: bool = True,
) -> dict[str, Any]:
    """`fn` on the views of every video of `shard` that decodes, averaged over each video's views.

    Args:
        fn: (normalised views [B*V,T,C,H,W], mask [B*V,T]) -> named outputs [B*V, ...]; it runs
            under `torch.inference_mode` and autocast.
        dataset: eval items (`EvalPreprocess.dataset` or `build_dataset(..., views=True)`).
        settings: device, normaliser, batch size, workers, precision and frame order.
        shard: the dataset indices to run, in this order.
        progress: show a progress bar.
        desc: the progress bar's label.
        num_views: the V the dataset must give per video (clips x crops), checked when set.
        average_views: False keeps every view's output: [n, V, ...] instead of [n, ...] (the
            token cache stores each view).

    Returns:
        {"indices": int64 [n], "labels": int64 [n], "outputs": {name: float32 [n, ...]}, "errors":
        {index: message}}, on the CPU, for the n videos that decoded and the ones that did not.

    Raises:
        ValueError: the dataset gives another number of views than `num_views`.
        LoaderStalled: a worker died, or a batch did not come within `settings.loader_timeout`.
    """
    device = settings.device
    shard = list(shard)
    loader = _shard_loader(dataset, shard, settings)
    indices: list[Tensor] = []
    labels: list[Tensor] = []
    outputs: dict[str, list[Tensor]] = {}
    errors: dict[int, str] = {}
    size = settings.batch_size

    def describe(k: int) -> str:
        return _describe_videos(dataset, shard[k * size : (k + 1) * size])

    batches = bounded_batches(loader, describe=describe, advice=_ADVICE)
    with torch.inference_mode():
        for batch in tqdm(batches, total=len(loader), desc=desc, disable=not progress):
            ok_B = ~batch["failed"].bool()
            for i in (~ok_B).nonzero().flatten().tolist():
                errors[int(batch["index"][i])] = batch["error"][i] if "error" in batch else "did not decode"
            if not ok_B.any():
                continue
            video_BVTCHW = batch["video"][ok_B]
            B, V = video_BVTCHW.shape[:2]
            if num_views is not None and V != num_views:
                raise ValueError(
                    f"the dataset gives {V} views per video but {num_views} were expected "
                    "(clips x crops): build it with matching test_clips/test_crops"
                )
            video, mask = _model_inputs(video_BVTCHW, batch["mask"][ok_B], batch["index"][ok_B], settings)
            with autocast(device, settings.precision):
                out = fn(video, mask)
            for name, value in out.items():
                per_view = value.unflatten(0, (B, V))
                kept = per_view.float().mean(dim=1) if average_views else per_view
                outputs.setdefault(name, []).append(kept.cpu())
            indices.append(batch["index"][ok_B].long())
            labels.append(batch["label"][ok_B].long())
    return {
        "indices": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        "outputs": {name: torch.cat(parts) for name, parts in outputs.items()},
        "errors": errors,
    }


def _shard_loader(dataset: Any, shard: list[int], settings: BatchSettings) -> DataLoader:
    """A loader over the `shard` indices, in order, with `settings`' batch size, workers and timeout."""
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=shard,  # a plain list of indices: no shuffling, no padding
        num_workers=settings.num_workers,
        timeout=settings.loader_timeout if settings.num_workers > 0 else 0,  # 0: what it must be without workers
        pin_memory=settings.device.type == "cuda",
        drop_last=False,
        worker_init_fn=ignore_stop_signals,
        generator=private_generator(0),
    )


def _model_inputs(
    video_BVTCHW: Tensor, mask_BVT: Tensor, video_ids: Tensor, settings: BatchSettings
) -> tuple[Tensor, Tensor]:
    """The views as `fn` takes them: frames reordered (if asked), flattened to [B*V, ...], normalised, on the device."""
    if settings.frame_order != "normal":
        video_BVTCHW = reorder_frames(
            video_BVTCHW,
            mask_BVT,
            settings.frame_order,
            video_ids=video_ids,
            seed=settings.frame_order_seed,
        )
    video = settings.normalizer(video_BVTCHW.flatten(0, 1).to(settings.device, non_blocking=True))
    mask = mask_BVT.flatten(0, 1).to(settings.device, non_blocking=True)
    return video, mask


def _describe_videos(dataset: Any, indices: Sequence[int], shown: int = 4) -> str:
    """ "videos 8, 9 (a.mp4, b.mp4)": dataset indices and, where the dataset lists records, their paths."""
    records = getattr(dataset, "records", None)
    names = [str(records[i].path) for i in indices[:shown]] if records is not None else []
    more = f", ... {len(indices) - shown} more" if len(indices) > shown else ""
    listing = f" ({', '.join(names)}{more})" if names else ""
    return f"videos {', '.join(map(str, indices))}{listing}"
