"""`PixelFrames`: the backbone of the temporal benchmark's pixel control, each frame as its downsampled pixels.

In place of a ViT, each normalised frame is averaged down to ``grid x grid`` cells and flattened
into one token of ``3 * grid * grid`` values: no weights, so a model on it (``fusion=joint_mlp``
reads all frames at once) shows what the raw frames carry. One token per frame, not one per
cell: every fusion and head normalises each token over its D values, which on a 3-value pixel
token would erase its brightness (a grey pixel becomes zeros), while over the whole frame it keeps
the picture and removes only the frame's mean brightness and contrast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from squarefuse.models.fusion.common import ArgumentError, check_int

__all__ = ["PixelFrames"]


class PixelFrames(nn.Module):
    """A normalised clip ``[B,T,3,H,W]`` in, one token of ``3 * grid * grid`` pixel values per frame out.

    Area averaging (`torch.nn.functional.adaptive_avg_pool2d`) to ``grid x grid``, then the
    channels and cells flattened (channel-major) into the token ``[B,T,1,3*grid*grid]``.

    Args:
        name: the name that the run's messages and model info show.
        img_size: the frame size the dataset crops to (``dataset.crop_size`` follows it).
        model_kwargs: ``grid``, the cells per side after area averaging (the only key).
        pretrained, pretrained_path, drop_path_rate, grad_checkpointing, freeze: the keys every backbone
            config has; there are no weights or blocks (``pretrained`` must be false, ``pretrained_path`` null).
    """

    # The tiny ViT's normalisation (vit_tiny_patch16_224's pretrained config: pixels to [-1, 1]),
    # so that the pixel control and the token control see the frames alike.
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    num_blocks = None  # no blocks to insert fusion layers after
    num_prefix_tokens = 0
    has_class_token = False
    num_tokens = 1

    def __init__(
        self,
        name: str = "pixels",
        img_size: int = 64,
        model_kwargs: Mapping[str, Any] | None = None,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        if pretrained or pretrained_path is not None:
            raise ValueError(
                f"backbone=pixels has no weights: set backbone.pretrained=false and backbone.pretrained_path=null "
                f"(got {pretrained!r} and {pretrained_path!r})"
            )
        model_kwargs = dict(model_kwargs or {"grid": 8})
        if set(model_kwargs) != {"grid"}:
            raise ValueError(f"backbone=pixels takes backbone.model_kwargs.grid only, got {model_kwargs!r}")
        try:
            self.img_size = check_int(img_size, "backbone.img_size", minimum=1)
            self.grid = check_int(model_kwargs["grid"], "backbone.model_kwargs.grid", minimum=1)
        except ArgumentError as e:
            raise ValueError(str(e)) from e
        if self.grid > self.img_size:
            raise ValueError(
                f"backbone.model_kwargs.grid={self.grid} is larger than backbone.img_size={img_size}: "
                "choose grid <= img_size"
            )
        self.name = name
        self.embed_dim = 3 * self.grid * self.grid
        self.freeze = freeze

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, grid={self.grid}, embed_dim={self.embed_dim}"

    def forward(
        self, video_BTCHW: Tensor, after_block: Mapping[int, Callable[[Tensor], Tensor]] | None = None
    ) -> Tensor:
        """Tokens ``[B,T,1,3*grid*grid]`` of a normalised clip ``[B,T,3,H,W]``."""
        if after_block:
            raise ValueError("fusion.after_blocks: backbone=pixels has no blocks")
        if video_BTCHW.ndim != 5 or video_BTCHW.shape[2] != 3:
            raise ValueError(f"backbone=pixels expects an RGB clip [B,T,3,H,W], got shape {tuple(video_BTCHW.shape)}")
        B, T, C, H, W = video_BTCHW.shape
        cells = F.adaptive_avg_pool2d(video_BTCHW.reshape(B * T, C, H, W), self.grid)
        return cells.reshape(B, T, 1, self.embed_dim)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """No backbone layers: fusion and head form the one (last) layer-decay group."""
        return {"stem": r"^$"}

    def no_weight_decay(self) -> set[str]:
        return set()
