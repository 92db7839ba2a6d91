"""Eval input preparation: a video file -> its eval views; uint8 frames stay uint8 until the device.

`VideoNormalizer` turns uint8 frames into the backbone's normalised floats on the device (train,
eval, predict); `input_normalizer` picks it, or `TokenInput` for a model on cached tokens.
`EvalPreprocess` reads a file through the same eval item of `VideoDataset` that eval reads a split's
videos with (same sampler, decoder, views, normalisation): what
`squarefuse.load_model` gives a model, and what the predict and extract apps run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from squarefuse.datasets.annotations import VideoRecord
from squarefuse.datasets.build import video_dataset_options
from squarefuse.datasets.decoding.video_reader import DecodeError
from squarefuse.datasets.inputs import NO_LABEL, parse_views
from squarefuse.datasets.video_dataset import VideoDataset


class VideoNormalizer:
    """uint8 video [..., C, H, W] on any device -> float32 normalised with the backbone's mean/std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        # Fold the /255 into the constants: one fused multiply-add on the device.
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32, device=device))).view(3, 1, 1)
        self.shift = (
            -torch.tensor(mean, dtype=torch.float32, device=device)
            / torch.tensor(std, dtype=torch.float32, device=device)
        ).view(3, 1, 1)

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        if video.dtype != torch.uint8:
            raise ValueError(f"expected uint8 video frames, got {video.dtype}")
        return torch.addcmul(self.shift, video.float(), self.scale)


class TokenInput:
    """Cached tokens (float16 on any device) -> float32: the input of a model on cached tokens."""

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not tokens.is_floating_point():
            raise ValueError(f"expected cached tokens (floats), got {tokens.dtype}: is this a token cache run?")
        return tokens.float()


def input_normalizer(
    mean: Sequence[float] | None, std: Sequence[float] | None, device: torch.device
) -> VideoNormalizer | TokenInput:
    """What turns a batch into the model's input: pixels are normalised, cached tokens (mean None) cast."""
    if mean is None or std is None:
        return TokenInput()
    return VideoNormalizer(mean, std, device)


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
