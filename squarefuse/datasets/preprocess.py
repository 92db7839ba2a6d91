"""Device-side input preparation: uint8 frames stay uint8 until they reach the device."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
