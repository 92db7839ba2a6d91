"""Use a trained checkpoint: load it with its eval preprocessing and run it on video files.

    import squarefuse
    model = squarefuse.load_model("runs/<run>/checkpoints/best.pt")
    print(squarefuse.predict(model, "clip.mp4"))  # [("pushing left to right", 0.93), ...]

`load_model` rebuilds the classifier as `eval.py` does (`select_weights`,
`build_model_from_checkpoint`), and `EvalPreprocess` reads a file through the same eval item of
`VideoDataset` that eval reads a split's videos with (same sampler, decoder, views and
normalisation, from the checkpoint's dataset config): a prediction here is eval's prediction for
that video and those views.

The apps (`scripts/predict.py`, `scripts/extract.py`) run many files through
`video_batches.run_batches`, the batch loop of eval, over `EvalPreprocess.dataset(paths)`.
"""

from __future__ import annotations

import errno
import logging
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from squarefuse.apps.evaluate import default_eval_dir, merge_dataset_overrides
from squarefuse.checkpoint import (
    build_model_from_checkpoint,
    check_checkpoint_file,
    load_checkpoint,
    select_weights,
)
from squarefuse.datasets.annotations import VideoRecord
from squarefuse.datasets.build import video_dataset_options
from squarefuse.datasets.decoding.video_reader import DecodeError
from squarefuse.datasets.preprocess import VideoNormalizer
from squarefuse.datasets.video_dataset import VideoDataset
from squarefuse.runtime.distributed import DistInfo, resolve_device
from squarefuse.runtime.precision import autocast, resolve_precision

__all__ = [
    "LIST_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "EvalPreprocess",
    "LoadedModel",
    "find_videos",
    "load_model",
    "parse_views",
    "predict",
    "predict_probs",
    "register_checkpoint_dir_resolver",
]

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ogv")
LIST_EXTENSIONS = (".txt", ".lst", ".list", ".csv")
NO_LABEL = -1  # the label of a video given without one


def parse_views(views: str | Sequence[int]) -> tuple[int, int]:
    """`"2x3"` or `[2, 3]` -> (clips, crops).

    Raises:
        ValueError: not two positive integers, or crops other than 1 or 3.
    """
    try:
        parts = str(views).lower().split("x") if isinstance(views, str) else list(views)
        clips, crops = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"views={views!r}: write CLIPSxCROPS, e.g. views=1x1 or views=2x3") from None
    if clips < 1 or crops not in (1, 3):
        raise ValueError(f"views={views!r}: need clips >= 1 and crops 1 or 3")
    return clips, crops


class EvalPreprocess:
    """A video file -> its normalised eval views, exactly as eval prepares a video of the split.

    Args:
        dataset_cfg: the dataset config the model was trained with (frames, sampling, stride,
            crop_size, eval_short_side, test_clips, test_crops, decoder, decode_timeout...).
        class_names: the model's classes (the datasets it builds report them).
        mean: the backbone's per-channel mean (0-1 pixel scale).
        std: the backbone's per-channel std.
        device: where `__call__` puts the normalised views.
        views: (clips, crops) or "CxK" instead of the config's test_clips x test_crops.
    """

    def __init__(
        self,
        dataset_cfg: Mapping[str, Any],
        *,
        class_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        views: str | Sequence[int] | None = None,
    ) -> None:
        cfg = OmegaConf.to_container(dataset_cfg, resolve=True) if isinstance(dataset_cfg, DictConfig) else dataset_cfg
        self.dataset_cfg = dict(cfg)
        if views is not None:
            self.dataset_cfg["test_clips"], self.dataset_cfg["test_crops"] = parse_views(views)
        self.class_names = list(class_names)
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device(device)
        self.options = video_dataset_options(self.dataset_cfg, train=False, views=True)
        self.normalizer = VideoNormalizer(self.mean, self.std, self.device)

    @property
    def views(self) -> tuple[int, int]:
        """(clips, crops) per video."""
        return self.options["frame_sampler"].num_clips, self.options["num_crops"]

    @property
    def num_frames(self) -> int:
        return self.options["frame_sampler"].num_frames

    @property
    def crop_size(self) -> int:
        return self.options["crop_size"]

    def with_views(self, views: str | Sequence[int]) -> EvalPreprocess:
        """The same preprocessing with other (clips, crops)."""
        return EvalPreprocess(
            self.dataset_cfg,
            class_names=self.class_names,
            mean=self.mean,
            std=self.std,
            device=self.device,
            views=views,
        )

    def dataset(self, videos: Sequence[str | Path | VideoRecord]) -> VideoDataset:
        """An eval dataset over `videos` (paths, or records with labels), in that order."""
        records = [v if isinstance(v, VideoRecord) else VideoRecord(str(v), NO_LABEL, str(v)) for v in videos]
        return VideoDataset(records, class_names=self.class_names, split="predict", **self.options)

    def load(self, path: str | Path) -> tuple[Tensor, Tensor]:
        """uint8 views [V,T,C,H,W] and mask [V,T] of one file, on the CPU (V = clips x crops).

        Raises:
            FileNotFoundError: no such file.
            DecodeError: the file does not decode (the message names it).
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"video not found: {path}")
        item = self.dataset([path])[0]
        if item["failed"]:
            raise DecodeError(item["error"])
        return item["video"], item["mask"]

    def __call__(self, path: str | Path) -> tuple[Tensor, Tensor]:
        """Normalised float views [V,T,C,H,W] and mask [V,T] of one file, on `device`."""
        video, mask = self.load(path)
        return self.normalizer(video.to(self.device)), mask.to(self.device)

    def __repr__(self) -> str:
        clips, crops = self.views
        return (
            f"EvalPreprocess(frames={self.num_frames}, sampling={self.options['frame_sampler'].sampling}, "
            f"views={clips}x{crops}, short_side={self.options['eval_short_side']}, crop={self.crop_size})"
        )


@dataclass
class LoadedModel:
    """What `load_model` returns.

    Attributes:
        model: the `VideoClassifier`, in eval mode, on `preprocess.device`.
        class_names: class id -> name.
        preprocess: the checkpoint's eval preprocessing (file -> normalised views).
        weights: "ema" or "model", which weights were loaded.
        checkpoint: the checkpoint's path.
        info: step, epoch and the stored config of the checkpoint.
    """

    model: nn.Module
    class_names: list[str]
    preprocess: EvalPreprocess
    weights: str
    checkpoint: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.preprocess.device


def load_model(
    ckpt: str | Path,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    *,
    dataset: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Rebuild a trained model from its checkpoint, with its class names and eval preprocessing.

    Args:
        ckpt: a checkpoint written by the trainer (`runs/<run>/checkpoints/best.pt`).
        use_ema: load the EMA weights when the checkpoint has them.
        device: "cpu", "cuda", "cuda:N" or "auto".
        dataset: overrides of the stored dataset config, as in `eval.py` (`decoder`,
            `test_clips`...); null values keep the stored value.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: the file is not a squarefuse trainer checkpoint, or an override names a key
            the stored dataset config lacks.
    """
    state = load_checkpoint(ckpt)
    for key in ("config", "class_names"):
        if key not in state:
            raise ValueError(f"{ckpt} has no '{key}' entry: it was not written by the squarefuse trainer")
    device = resolve_device(str(device), DistInfo())
    weights, weights_name = select_weights(state, use_ema)
    model = build_model_from_checkpoint(state, weights).to(device).eval()
    class_names = list(state["class_names"])
    dataset_cfg = merge_dataset_overrides(state["config"]["dataset"], dataset)
    preprocess = EvalPreprocess(dataset_cfg, class_names=class_names, mean=model.mean, std=model.std, device=device)
    info = {"step": state.get("step"), "epoch": state.get("epoch"), "config": state["config"]}
    return LoadedModel(model, class_names, preprocess, weights_name, str(ckpt), info)


def predict_probs(
    model: LoadedModel, path: str | Path, *, views: str | Sequence[int] | None = None, precision: str = "auto"
) -> Tensor:
    """Class probabilities [C] of one video: softmax per view, averaged over the views (as eval).

    Args:
        model: what `load_model` returned.
        path: the video file.
        views: (clips, crops) or "CxK"; None = the checkpoint's eval views.
        precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32.
    """
    preprocess = model.preprocess if views is None else model.preprocess.with_views(views)
    video, mask = preprocess(path)
    with torch.inference_mode(), autocast(model.device, resolve_precision(precision, model.device)):
        logits = model.model(video, mask)
    return logits.float().softmax(dim=-1).mean(dim=0).cpu()


def predict(
    model: LoadedModel,
    path: str | Path,
    topk: int = 5,
    views: str | Sequence[int] | None = None,
    *,
    precision: str = "auto",
) -> list[tuple[str, float]]:
    """The `topk` most likely classes of one video, as (class name, probability), best first.

    Args:
        model: what `load_model` returned.
        path: the video file.
        topk: how many classes (at most the number of classes).
        views: (clips, crops) or "CxK"; None = the checkpoint's eval views ("1x1" is fastest).
        precision: auto | bf16 | fp16 | fp32.

    Raises:
        FileNotFoundError, DecodeError: the video is missing or does not decode.
    """
    if topk < 1:
        raise ValueError(f"topk={topk}: must be >= 1")
    probs = predict_probs(model, path, views=views, precision=precision)
    top = probs.topk(min(topk, probs.numel()))
    return [(model.class_names[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


# ----------------------------------------------------------------------------------------------
# Many videos


def _read_video_list(list_file: Path) -> list[VideoRecord]:
    """`path label` or plain `path` lines; relative paths are relative to the list's folder."""
    records = []
    for raw in list_file.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, label = line, NO_LABEL
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            name, label = parts[0], int(parts[1])
        records.append(VideoRecord(str(list_file.parent / Path(name).expanduser()), label, name))
    if not records:
        raise ValueError(f"input={list_file}: the list file names no video")
    return records


def _why_skipped(path: Path) -> str | None:
    """Why a folder search leaves out an entry that looks like a video (or a folder of them), None
    for one that is no video: a search must not stop at it (a FIFO blocks the reader), nor drop it unsaid."""
    if path.is_symlink() and path.is_dir():
        # rglob does not follow links to folders (a link to an ancestor would never end).
        return "a link to a folder, not searched (links to folders are not followed)"
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        return None
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        return "a broken link" if path.is_symlink() else f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None  # a video file (the caller takes it)
    if stat.S_ISDIR(mode):
        return "a folder with a video extension, not a video file (its contents are searched)"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a video file"
    return "not a regular file (a socket or device)"


def find_videos(input: str | Path) -> list[VideoRecord]:
    """The videos an `input=` names: one video file, a folder (searched recursively for files
    with a video extension, sorted), or a list file (`path label` or `path` per line).

    In a folder, entries with a video extension that are no regular file (a folder, a FIFO, a
    symlink loop, a broken link) and links to folders are skipped, each logged with why, then a count.

    Raises:
        FileNotFoundError: `input` does not exist.
        ValueError: an empty folder or list, or a file that is neither a video nor a list.
    """
    path = Path(input).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input={input}: no such file or folder")
    if path.is_dir():
        files, skipped = [], []
        for p in sorted(path.rglob("*")):
            if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file():
                files.append(p)
            elif (why := _why_skipped(p)) is not None:
                skipped.append(p)
                log.warning(f"input={input}: skipped {p.relative_to(path)}: {why}")
        if skipped:
            log.warning(f"input={input}: {len(skipped)} entries skipped (listed above)")
        if not files:
            raise ValueError(
                f"input={input}: no video files ({' '.join(VIDEO_EXTENSIONS)}) in this folder or below"
                + (f" ({len(skipped)} entries skipped, see the warnings)" if skipped else "")
            )
        return [VideoRecord(str(p), NO_LABEL, str(p.relative_to(path))) for p in files]
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return [VideoRecord(str(path), NO_LABEL, path.name)]
    if path.suffix.lower() in LIST_EXTENSIONS:
        return _read_video_list(path)
    raise ValueError(
        f"input={input}: neither a video ({' '.join(VIDEO_EXTENSIONS)}) nor a list file ({' '.join(LIST_EXTENSIONS)})"
    )


def register_checkpoint_dir_resolver(usage: str) -> None:
    """Register `${checkpoint_dir:CKPT,SUBDIR}` for an app's `hydra.run.dir`: `<run>/SUBDIR/<stamp>`
    next to the checkpoint's run (`eval_app.default_eval_dir`).

    Hydra resolves it before the app runs, where an exception would come wrapped in a page of
    interpolation traceback: a missing or absent `ckpt` exits with the message (and `usage`).
    """

    def resolve(ckpt: str | None, subdir: str) -> str:
        if ckpt is None:
            sys.exit(f"error: ckpt is required: {usage}")
        try:
            check_checkpoint_file(ckpt)  # before Hydra makes a folder next to a file that is no checkpoint
            return default_eval_dir(str(ckpt), str(subdir))
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")

    # Cached: the stamp is read once, so every use of hydra.run.dir names the same folder.
    OmegaConf.register_new_resolver("checkpoint_dir", resolve, use_cache=True, replace=True)
