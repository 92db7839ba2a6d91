"""CPU augmentation of uint8 clips [T,C,H,W] with torchvision.transforms.v2.

A clip is wrapped as a `tv_tensors.Video`, so every random transform draws its parameters once
per call and applies them to all frames alike (one crop, one flip, one RandAugment policy per
clip). Frames stay uint8: normalisation happens on the device.

Train: RandomResizedCrop -> horizontal flip (only when ``hflip``: never for SSv2 or the
synthetic set, whose labels name directions) -> RandAugment -> random erasing.
Eval: resize the short side to ``short_side``, then 1 centre crop or 3 crops along the long side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "DeviceAugment",
    "RandomErasingUint8",
    "TrainTransform",
    "default_eval_short_side",
    "eval_views",
    "photometric_steps",
]


class RandomErasingUint8(v2.RandomErasing):
    """`v2.RandomErasing` whose random fill also works on uint8.

    torchvision's ``value="random"`` fills with standard-normal floats, which on uint8 become
    0..3 and (wrapped negatives) 253..255: a salt-and-pepper patch, not noise. Here the random
    fill is uniform over the dtype's range (0..255 for uint8, 0..1 for floats); one patch and
    one fill per clip, the same in every frame.

    Args:
        p, scale, ratio: as in `v2.RandomErasing`.
    """

    def __init__(
        self, p: float = 0.5, scale: Sequence[float] = (0.02, 0.33), ratio: Sequence[float] = (0.3, 3.3)
    ) -> None:
        super().__init__(p=p, scale=scale, ratio=ratio, value="random")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params = super().make_params(flat_inputs)
        if params["v"] is not None:
            dtype = next(x.dtype for x in flat_inputs if isinstance(x, torch.Tensor))
            shape = params["v"].shape
            if dtype == torch.uint8:
                params["v"] = torch.randint(0, 256, shape, dtype=torch.uint8)
            else:
                params["v"] = torch.rand(shape, dtype=dtype)
        return params


class TrainTransform:
    """The train augmentation of one clip: uint8 [T,C,H,W] -> uint8 [T,C,crop_size,crop_size].

    Args:
        crop_size: output height and width.
        scale: RandomResizedCrop area range (fraction of the frame).
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: flip horizontally with probability 0.5.
        randaug_n: RandAugment operations per clip (0 = off).
        randaug_m: RandAugment magnitude on timm's 0..10 scale (``rand-m7-n4`` -> m=7, n=4);
            timm's magnitude noise (mstd) and "increasing" variants are not reproduced.
        random_erasing: probability of erasing one random patch with uniform noise.
        photometric: include RandAugment and random erasing; False when `DeviceAugment` applies
            them to the batch on the training device instead.
    """

    def __init__(
        self,
        *,
        crop_size: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (0.75, 4 / 3),
        hflip: bool = False,
        randaug_n: int = 0,
        randaug_m: int = 0,
        random_erasing: float = 0.0,
        photometric: bool = True,
    ) -> None:
        if not (0.0 <= random_erasing <= 1.0):
            raise ValueError(f"dataset.random_erasing={random_erasing}: must be a probability in [0, 1]")
        if randaug_n < 0 or not (0 <= randaug_m <= 10):
            raise ValueError(f"dataset.randaug_n={randaug_n}, dataset.randaug_m={randaug_m}: need n >= 0, 0 <= m <= 10")
        if len(scale) != 2 or not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"dataset.scale={list(scale)}: need [min, max] with 0 < min <= max <= 1")
        if len(ratio) != 2 or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"dataset.ratio={list(ratio)}: need [min, max] with 0 < min <= max")
        steps: list[v2.Transform] = [
            v2.RandomResizedCrop(crop_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)
        ]
        if hflip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        if photometric:
            steps += photometric_steps(randaug_n=randaug_n, randaug_m=randaug_m, random_erasing=random_erasing)
        self.transform = v2.Compose(steps)

    def __call__(self, video_TCHW: torch.Tensor) -> torch.Tensor:
        return self.transform(tv_tensors.Video(video_TCHW)).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"TrainTransform({self.transform})"


def photometric_steps(*, randaug_n: int, randaug_m: int, random_erasing: float) -> list[v2.Transform]:
    """RandAugment then random erasing, the costly part of the train augmentation."""
    steps: list[v2.Transform] = []
    if randaug_n > 0:
        # 11 bins make `magnitude` read on timm's 0..10 scale with the same maximum strengths.
        steps.append(v2.RandAugment(num_ops=randaug_n, magnitude=randaug_m, num_magnitude_bins=11))
    if random_erasing > 0:
        steps.append(RandomErasingUint8(p=random_erasing))
    return steps


class DeviceAugment:
    """RandAugment + random erasing of a uint8 batch [B,T,C,H,W] on the training device.

    RandAugment n=4 on a 16x224x224 clip costs about as much CPU time as decoding it, which halves
    what a loader worker delivers; on the GPU it is a few kernels per clip. Each clip draws its own
    policy (the same for all its frames), as in the worker. Randomness comes from the global torch
    RNG of the training process, so it is part of the exactly-resumable state.
    """

    def __init__(self, *, randaug_n: int, randaug_m: int, random_erasing: float) -> None:
        self.transform = v2.Compose(
            photometric_steps(randaug_n=randaug_n, randaug_m=randaug_m, random_erasing=random_erasing)
        )

    def __call__(self, video_BTCHW: torch.Tensor) -> torch.Tensor:
        clips = [self.transform(tv_tensors.Video(clip)).as_subclass(torch.Tensor) for clip in video_BTCHW]
        return torch.stack(clips)

    def __repr__(self) -> str:
        return f"DeviceAugment({self.transform})"


def default_eval_short_side(crop_size: int) -> int:
    """The usual test-time short side for a crop: 224 -> 256."""
    return int(round(crop_size * 256 / 224))


def eval_views(video_TCHW: torch.Tensor, *, short_side: int, crop_size: int, num_crops: int) -> torch.Tensor:
    """Resize the short side and take 1 centre crop or 3 crops along the long side.

    Args:
        video_TCHW: uint8 clip.
        short_side: the short side after resizing (>= crop_size).
        crop_size: crop height and width.
        num_crops: 1 (centre) or 3 (start, centre, end of the long side: left/centre/right for
            landscape frames, top/centre/bottom for portrait ones).

    Returns:
        uint8 [num_crops, T, C, crop_size, crop_size].
    """
    if num_crops not in (1, 3):
        raise ValueError(f"dataset.test_crops={num_crops}: choose 1 or 3")
    if short_side < crop_size:
        raise ValueError(f"dataset.eval_short_side={short_side} is smaller than dataset.crop_size={crop_size}")
    video = F.resize(tv_tensors.Video(video_TCHW), [short_side], antialias=True).as_subclass(torch.Tensor)
    height, width = video.shape[-2:]
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    if num_crops == 1:
        corners = [(top, left)]
    elif width >= height:
        corners = [(top, 0), (top, left), (top, width - crop_size)]
    else:
        corners = [(0, left), (top, left), (height - crop_size, left)]
    return torch.stack([video[..., y : y + crop_size, x : x + crop_size] for y, x in corners])
