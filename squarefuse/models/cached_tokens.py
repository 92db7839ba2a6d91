"""`CachedTokens`: the backbone of a model trained on a token cache, which passes the cached tokens through.

A token cache (`squarefuse.datasets.token_cache`) holds what a frozen `VideoBackbone` gave for
each frame, ``[T,N,D]`` per view. In its place, this module hands those tokens to the fusion
unchanged, with the cached backbone's token layout (embed_dim, prefix tokens, class token), so
`VideoClassifier` runs the fusion and head as on the videos and has only their parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["CachedTokens"]


class CachedTokens(nn.Module):
    """Cached per-frame tokens ``[B,T,N,D]`` in, the same tokens (as float32) out.

    Args:
        name: the timm name of the backbone that made the cache (for messages and model info).
        img_size: the frame size the cache was made at.
        model_kwargs: the cached token layout: ``embed_dim`` (D), ``num_prefix_tokens`` (class token,
            registers), ``has_class_token``, ``num_tokens`` (N: all, the prefix only, or pooled).
        pretrained, pretrained_path, drop_path_rate, grad_checkpointing, freeze: the keys every
            backbone config has; there are no weights here (`pretrained_path` must be null).
    """

    mean = None  # no pixels, hence no normalisation: `squarefuse.datasets.preprocess.input_normalizer`
    std = None
    num_blocks = None  # no blocks to insert fusion layers after

    def __init__(
        self,
        name: str,
        img_size: int,
        model_kwargs: Mapping[str, Any],
        pretrained: bool = False,
        pretrained_path: str | None = None,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        if pretrained_path is not None:
            raise ValueError(
                f"backbone.pretrained_path={pretrained_path!r}: a model trained on cached tokens has no backbone "
                "weights; the cache holds the backbone's output"
            )
        self.name, self.img_size = name, int(img_size)
        self.embed_dim, self.num_tokens = int(model_kwargs["embed_dim"]), int(model_kwargs["num_tokens"])
        self.num_prefix_tokens = int(model_kwargs["num_prefix_tokens"])
        self.has_class_token = bool(model_kwargs["has_class_token"])
        self.freeze = True

    @property
    def token_shape(self) -> tuple[int, int]:
        """(N, D) of one frame's tokens: what `squarefuse.models.complexity` feeds the model."""
        return self.num_tokens, self.embed_dim

    def forward(
        self, tokens_BTND: Tensor, after_block: Mapping[int, Callable[[Tensor], Tensor]] | None = None
    ) -> Tensor:
        if after_block:
            raise ValueError("fusion.after_blocks: a model trained on cached tokens has no backbone blocks")
        if tokens_BTND.ndim != 4 or tuple(tokens_BTND.shape[2:]) != self.token_shape:
            raise ValueError(
                f"expected cached tokens [B,T,{self.num_tokens},{self.embed_dim}], got {tuple(tokens_BTND.shape)}"
            )
        return tokens_BTND.float()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """No backbone layers: fusion and head form the one (last) layer-decay group."""
        return {"stem": r"^$"}

    def no_weight_decay(self) -> set[str]:
        return set()
