"""`build_dataset`: a dataset config (``configs/dataset/*.yaml``) and a split name -> VideoDataset.

Splits are named freely: split "train" gives random, augmented train items; any other name
("val", "test", ...) gives deterministic eval items. A split's annotation file is the config key
``{split}_file``; its video folder ``{split}_video_dir`` when the config has one, else
``video_dir``.

Missing videos are looked for at start-up (one directory listing per folder), logged with a count
and the first few paths, written in full to ``report_dir/missing_{split}.txt``, and left out; more
than ``dataset.max_missing_fraction`` of a split missing is an error (a wrong root, a half-copied
dataset).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from squarefuse.datasets.annotations import (
    Annotations,
    k400_class_names,
    list_num_classes,
    load_k400,
    load_list,
    load_ssv2,
    read_label_map,
    split_missing,
)
from squarefuse.datasets.gpu_decode import GpuClipDecoder, check_decode_device
from squarefuse.datasets.sampling import FrameSampler
from squarefuse.datasets.transforms import DeviceAugment, TrainTransform, default_eval_short_side
from squarefuse.datasets.video_dataset import VideoDataset
from squarefuse.datasets.video_reader import resolve_decoder

__all__ = ["DATASET_NAMES", "build_dataset", "build_device_augment", "build_gpu_decoder", "load_annotations"]

log = logging.getLogger(__name__)

DATASET_NAMES = ("ssv2", "k400", "list", "synthetic")


def _key(cfg: Mapping[str, Any], key: str) -> Any:
    value = cfg.get(key)
    if value is None:
        raise ValueError(f"dataset.{key} is not set (dataset.name={cfg.get('name')!r})")
    return value


def _split_file(cfg: Mapping[str, Any], split: str) -> Any:
    if cfg.get(f"{split}_file") is None:
        raise ValueError(f"dataset.{split}_file is not set: dataset {cfg.get('name')!r} has no split {split!r}")
    return cfg[f"{split}_file"]


def _video_dir(cfg: Mapping[str, Any], split: str) -> Any:
    video_dir = cfg.get(f"{split}_video_dir") or cfg.get("video_dir")
    if video_dir is None:
        raise ValueError(f"neither dataset.{split}_video_dir nor dataset.video_dir is set")
    return video_dir


def _class_names_from(cfg: Mapping[str, Any], fallback: Callable[[], list[str]]) -> list[str]:
    if cfg.get("label_map") is not None:
        return read_label_map(cfg["label_map"])
    return fallback()


def load_annotations(cfg: Mapping[str, Any], split: str) -> Annotations:
    """The records (missing files included) and class names of one split of a dataset config.

    For the synthetic dataset this generates the videos first if needed.
    """
    name = cfg.get("name")
    if name == "ssv2":
        return load_ssv2(
            labels_file=_key(cfg, "labels_file"),
            annotation_file=_split_file(cfg, split),
            video_dir=_video_dir(cfg, split),
            video_ext=str(cfg.get("video_ext", "webm")),
        )
    if name == "k400":
        class_names = _class_names_from(cfg, lambda: k400_class_names(_split_file(cfg, "train")))
        return load_k400(
            annotation_file=_split_file(cfg, split),
            class_names=class_names,
            video_dir=_video_dir(cfg, split),
            video_ext=str(cfg.get("video_ext", "mp4")),
            layout=str(cfg.get("layout", "auto")),
        )
    if name == "list":

        def numbered() -> list[str]:
            count = cfg.get("num_classes") or list_num_classes(_split_file(cfg, "train"))
            return [str(i) for i in range(int(count))]

        return load_list(
            list_file=_split_file(cfg, split),
            video_dir=cfg.get(f"{split}_video_dir") or cfg.get("video_dir"),
            class_names=_class_names_from(cfg, numbered),
        )
    if name == "synthetic":
        # Imported on use: only this dataset needs the generator.
        from squarefuse.datasets.synthetic import ensure_synthetic  # noqa: PLC0415

        generate = dict(cfg.get("generate") or {})
        splits = ensure_synthetic(_key(cfg, "root"), **generate)
        lists = {"train": splits.train_list, "val": splits.val_list}
        if split not in lists:
            raise ValueError(f"the synthetic dataset has splits {list(lists)}, not {split!r}")
        return load_list(list_file=lists[split], video_dir=splits.root, class_names=list(splits.class_names))
    raise ValueError(f"dataset.name={name!r}: choose one of {list(DATASET_NAMES)}")


def _report_missing(
    missing: list[str], total: int, *, name: str, split: str, max_fraction: float, report_dir: str | Path | None
) -> None:
    report = None
    if report_dir is not None:
        report = Path(report_dir) / f"missing_{split}.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(f"{p}\n" for p in missing), encoding="utf-8")
    if not missing:
        return
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
    if not cfg.get("augment_on_device", False):
        return None
    randaug_n, erasing = int(cfg.get("randaug_n", 0)), float(cfg.get("random_erasing", 0.0))
    if randaug_n == 0 and erasing == 0:
        return None
    return DeviceAugment(randaug_n=randaug_n, randaug_m=int(cfg.get("randaug_m", 0)), random_erasing=erasing)


def build_dataset(
    dataset_cfg: Mapping[str, Any], split: str, *, views: bool = False, report_dir: str | Path | None = None
) -> VideoDataset:
    """Build one split of the dataset a config describes.

    Args:
        dataset_cfg: the ``dataset`` block of the config (DictConfig or dict).
        split: "train" for training items; any other split (with a ``{split}_file`` key) for
            deterministic eval items.
        views: eval only: dataset.test_clips x dataset.test_crops views per video (multi-view
            test) instead of 1 centre clip x 1 centre crop (clip-level validation).
        report_dir: where ``missing_{split}.txt`` is written; None writes nothing (non-zero ranks).

    Returns:
        The `VideoDataset`.

    Raises:
        ValueError: unknown name/decoder/sampling, malformed annotations, too many videos missing.
        FileNotFoundError: an annotation file does not exist.
    """
    cfg = dataset_cfg
    name = str(cfg.get("name"))
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset.name={cfg.get('name')!r}: choose one of {list(DATASET_NAMES)}")
    train = split == "train"
    decoder = resolve_decoder(str(_key(cfg, "decoder")))
    fallback = cfg.get("fallback_decoder")
    fallback = resolve_decoder(str(fallback)) if fallback else None
    sampler = FrameSampler(
        sampling=str(_key(cfg, "sampling")),
        num_frames=int(_key(cfg, "num_frames")),
        stride=int(cfg.get("stride") or 1),
        train=train,
        num_clips=int(cfg.get("test_clips") or 1) if (views and not train) else 1,
        short_video=str(cfg.get("short_video", "pad")),
    )
    crop_size = int(_key(cfg, "crop_size"))
    num_crops = int(cfg.get("test_crops") or 1) if (views and not train) else 1
    if num_crops not in (1, 3):
        raise ValueError(f"dataset.test_crops={num_crops}: choose 1 or 3")
    train_transform = None
    if train:
        train_transform = TrainTransform(
            crop_size=crop_size,
            scale=tuple(cfg.get("scale", (0.08, 1.0))),
            ratio=tuple(cfg.get("ratio", (0.75, 4 / 3))),
            hflip=bool(cfg.get("hflip", False)),
            randaug_n=int(cfg.get("randaug_n", 0)),
            randaug_m=int(cfg.get("randaug_m", 0)),
            random_erasing=float(cfg.get("random_erasing", 0.0)),
            photometric=not bool(cfg.get("augment_on_device", False)),
        )
    eval_short_side = int(cfg.get("eval_short_side") or default_eval_short_side(crop_size))
    if eval_short_side < crop_size:
        raise ValueError(f"dataset.eval_short_side={eval_short_side} is smaller than dataset.crop_size={crop_size}")
    decode_short_side = _decode_short_side(cfg.get("decode_short_side"), eval_short_side=eval_short_side)
    # Only train clips are decoded on the GPU: an eval of a GPU-decoded run works on a CPU machine.
    decode_device = check_decode_device(str(cfg.get("decode_device") or "cpu")) if train else "cpu"

    annotations = load_annotations(cfg, split)
    records, missing = split_missing(annotations.records)
    _report_missing(
        missing,
        len(annotations.records),
        name=name,
        split=split,
        max_fraction=float(cfg.get("max_missing_fraction", 0.0)),
        report_dir=report_dir,
    )
    timeout = cfg.get("decode_timeout")
    return VideoDataset(
        records,
        class_names=annotations.class_names,
        sampler=sampler,
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
        repeated_aug=int(cfg.get("repeated_aug", 1) or 1) if train else 1,
        max_replacements=int(cfg.get("max_replacements", 10)),
        missing=missing,
        split=split,
    )
