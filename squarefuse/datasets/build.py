"""`build_dataset`: a dataset config (``configs/dataset/*.yaml``) and a split name -> VideoDataset.

Splits are named freely: split "train" gives random, augmented train items; any other name
("val", "test", ...) gives deterministic eval items. `dataset.name` names the annotation format
(`squarefuse.datasets.formats`), which reads the split's records and class names; everything
else (frames, decoding, crops, augmentation) is read here, the same for every format. Every key
comes from the config; the defaults live in squarefuse/config/defaults/dataset/base.yaml.

Missing videos are looked for at start-up (one directory listing per folder), logged with a count
and the first few paths, written in full to ``report_dir/missing_{split}.txt``, and left out; more
than ``dataset.max_missing_fraction`` of a split missing is an error (a wrong root, a half-copied
dataset).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from squarefuse.datasets.annotations import Annotations, split_missing
from squarefuse.datasets.decoding.gpu import GpuClipDecoder, check_decode_device
from squarefuse.datasets.decoding.video_reader import resolve_decoder
from squarefuse.datasets.formats import FORMATS, find_format, optional, required
from squarefuse.datasets.frame_sampling import FrameSampler
from squarefuse.datasets.transforms import DeviceAugment, TrainTransform, default_eval_short_side
from squarefuse.datasets.video_dataset import VideoDataset

__all__ = [
    "DATASET_NAMES",
    "build_dataset",
    "build_device_augment",
    "build_gpu_decoder",
    "check_run_dir",
    "load_annotations",
    "video_dataset_options",
]

log = logging.getLogger(__name__)

DATASET_NAMES = tuple(FORMATS)


def load_annotations(cfg: Mapping[str, Any], split: str) -> Annotations:
    """The records (missing files included) and class names of one split of a dataset config.

    For the synthetic dataset this generates the videos first if needed.
    """
    return find_format(required(cfg, "name")).load(cfg, split)


def _report_missing(
    missing: list[str], total: int, *, name: str, split: str, max_fraction: float, report_dir: str | Path | None
) -> None:
    report = Path(report_dir) / f"missing_{split}.txt" if report_dir is not None else None
    if not missing:
        if report is not None:
            report.unlink(missing_ok=True)  # a resumed run's list from when videos were missing
        return
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(f"{p}\n" for p in missing), encoding="utf-8")
    where = f"; full list in {report}" if report else ""
    message = f"{name} {split}: {len(missing)} of {total} videos are missing, e.g. {missing[:3]}{where}"
    if len(missing) == total or len(missing) / total > max_fraction:
        raise ValueError(
            f"{message}. That is more than dataset.max_missing_fraction={max_fraction}: "
            "check dataset.root and the video folder keys"
        )
    log.warning(f"{message}; they are left out")


def _decode_short_side(value: Any, *, eval_short_side: int) -> int | None:
    """``dataset.decode_short_side``: "auto" = the eval short side (256 for 224 crops), also used for
    train clips, whose RandomResizedCrop then works on the frame size the usual K400/SSv2
    preprocessing stores; a number = that short side; null or 0 = decode every video as stored."""
    if value is None or value == 0:
        return None
    if value == "auto":
        return eval_short_side
    try:
        short_side = int(value)
    except (TypeError, ValueError):
        short_side = -1
    if short_side <= 0:
        raise ValueError(f"dataset.decode_short_side={value!r}: choose auto, null or a positive number of pixels")
    return short_side


def build_gpu_decoder(train_set: VideoDataset, device: Any) -> GpuClipDecoder | None:
    """The training process's clip decoder when the train set was built with ``decode_device=cuda``."""
    if train_set.decode_device == "cpu":
        return None
    return GpuClipDecoder(
        device=device,
        transform=train_set.train_transform,
        short_side=train_set.decode_short_side,
        cpu_decoder=train_set.fallback_decoder or train_set.decoder,
        decode_timeout=train_set.decode_timeout,
        repeated_aug=train_set.repeated_aug,
    )


def build_device_augment(dataset_cfg: Mapping[str, Any]) -> DeviceAugment | None:
    """The photometric train augmentation to run on the device, when `dataset.augment_on_device`."""
    cfg = dataset_cfg
    if not find_format(required(cfg, "name")).decodes_videos or not required(cfg, "augment_on_device"):
        return None  # items without pixels (cached tokens) have nothing to augment
    randaug_n, erasing = int(required(cfg, "randaug_n")), float(required(cfg, "random_erasing"))
    if randaug_n == 0 and erasing == 0:
        return None
    return DeviceAugment(randaug_n=randaug_n, randaug_m=int(required(cfg, "randaug_m")), random_erasing=erasing)


def video_dataset_options(dataset_cfg: Mapping[str, Any], *, train: bool, views: bool) -> dict[str, Any]:
    """The `VideoDataset` keyword arguments a dataset config sets: sampling, decoding, transforms.

    Everything but the videos themselves, so that any list of records (a split's, or the files
    `scripts/predict.py` is given) is read exactly as `build_dataset` reads a split.

    Args:
        dataset_cfg: the ``dataset`` block of the config.
        train: train items (random clip, augmented) or deterministic eval items.
        views: eval only: test_clips x test_crops views instead of 1 centre clip x 1 centre crop.

    Raises:
        ValueError: a key is missing or has a bad value (named).
    """
    cfg = dataset_cfg
    multi_view = views and not train
    decoder = resolve_decoder(str(required(cfg, "decoder")))
    fallback = optional(cfg, "fallback_decoder")
    fallback = resolve_decoder(str(fallback)) if fallback else None
    frame_sampler = FrameSampler(
        sampling=str(required(cfg, "sampling")),
        num_frames=int(required(cfg, "num_frames")),
        stride=int(required(cfg, "stride")),
        train=train,
        num_clips=int(required(cfg, "test_clips")) if multi_view else 1,
        short_video=str(required(cfg, "short_video")),
    )
    crop_size = int(required(cfg, "crop_size"))
    num_crops = int(required(cfg, "test_crops")) if multi_view else 1
    if num_crops not in (1, 3):
        raise ValueError(f"dataset.test_crops={num_crops}: choose 1 or 3")
    train_transform = None
    if train:
        train_transform = TrainTransform(
            crop_size=crop_size,
            scale=tuple(required(cfg, "scale")),
            ratio=tuple(required(cfg, "ratio")),
            hflip=bool(required(cfg, "hflip")),
            randaug_n=int(required(cfg, "randaug_n")),
            randaug_m=int(required(cfg, "randaug_m")),
            random_erasing=float(required(cfg, "random_erasing")),
            photometric=not required(cfg, "augment_on_device"),
        )
    eval_short_side = int(optional(cfg, "eval_short_side") or default_eval_short_side(crop_size))
    if eval_short_side < crop_size:
        raise ValueError(f"dataset.eval_short_side={eval_short_side} is smaller than dataset.crop_size={crop_size}")
    decode_short_side = _decode_short_side(optional(cfg, "decode_short_side"), eval_short_side=eval_short_side)
    # Only train clips are decoded on the GPU: an eval of a GPU-decoded run works on a CPU machine.
    decode_device = check_decode_device(str(required(cfg, "decode_device"))) if train else "cpu"

    timeout = optional(cfg, "decode_timeout")  # 0 or null: unguarded
    max_replacements = int(required(cfg, "max_replacements"))
    if max_replacements < 0:
        raise ValueError(f"dataset.max_replacements={max_replacements}: must be >= 0 (0: fail at the first bad video)")
    return dict(
        frame_sampler=frame_sampler,
        train=train,
        crop_size=crop_size,
        train_transform=train_transform,
        eval_short_side=eval_short_side,
        num_crops=num_crops,
        decoder=decoder,
        fallback_decoder=fallback,
        decode_timeout=float(timeout) if timeout else None,
        decode_short_side=decode_short_side,
        decode_device=decode_device,
        repeated_aug=int(required(cfg, "repeated_aug")) if train else 1,
        max_replacements=max_replacements,
    )


def check_run_dir(dataset_cfg: Mapping[str, Any], run_dir: str | Path) -> None:
    """Refuse a run folder inside a synthetic dataset's root, before anything is generated.

    The generator owns that folder: it refuses one holding files it did not write (the run's
    config, lock and checkpoints), with a message about foreign files that does not say why.
    """
    if find_format(required(dataset_cfg, "name")).name != "synthetic":
        return
    root = Path(str(required(dataset_cfg, "root"))).expanduser().resolve()
    run = Path(run_dir).expanduser().resolve()
    if run == root or root in run.parents:
        raise ValueError(
            f"the run folder {run} (hydra.run.dir) is inside dataset.root={root}, where the synthetic dataset is "
            f"generated and nothing else may be: put the run elsewhere (the default is runs/...) or the dataset "
            f"elsewhere (dataset.root=...)"
        )


def build_dataset(
    dataset_cfg: Mapping[str, Any], split: str, *, views: bool = False, report_dir: str | Path | None = None
) -> VideoDataset | Dataset:
    """Build one split of the dataset a config describes.

    Args:
        dataset_cfg: the ``dataset`` block of the config (DictConfig or dict).
        split: "train" for training items; any other split (with a ``{split}_file`` key) for
            deterministic eval items. With ``dataset.name=tokens``, a split of a token cache
            (`squarefuse.datasets.token_cache.TokenDataset`).
        views: eval only: dataset.test_clips x dataset.test_crops views per video (multi-view
            test) instead of 1 centre clip x 1 centre crop (clip-level validation).
        report_dir: where ``missing_{split}.txt`` (a token cache: ``token_cache_{split}.json``, the cache
            files read) is written; None writes nothing (non-zero ranks).

    Returns:
        The `VideoDataset` (a token cache: its `TokenDataset`).

    Raises:
        ValueError: unknown name/decoder/sampling, malformed annotations, too many videos missing.
        FileNotFoundError: an annotation file does not exist.
    """
    dataset_format = find_format(required(dataset_cfg, "name"))
    # A format that reads its own items (a token cache: eval items give all its cached views, train items one).
    own = dataset_format.open_split(dataset_cfg, split, views=views, report_dir=report_dir)
    if own is not None:
        return own
    options = video_dataset_options(dataset_cfg, train=split == "train", views=views)
    annotations = dataset_format.load(dataset_cfg, split)
    records, missing = split_missing(annotations.records)
    _report_missing(
        missing,
        len(annotations.records),
        name=dataset_format.name,
        split=split,
        max_fraction=float(required(dataset_cfg, "max_missing_fraction")),
        report_dir=report_dir,
    )
    return VideoDataset(records, class_names=annotations.class_names, missing=missing, split=split, **options)
