"""The video classifier: per-frame backbone -> temporal fusion -> head."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import hydra.utils
import torch
from torch import Tensor, nn

from squarefuse.models.backbone import VideoBackbone, prefix_group_matcher

__all__ = ["VideoClassifier", "build_classifier"]


class VideoClassifier(nn.Module):
    """Backbone on every frame, fusion over time, head on the fused tokens.

    Padded frames (mask False) never change the logits: the backbone treats frames
    independently, the fusion ignores them and the head averages over valid frames only.

    Args:
        backbone: The per-frame backbone.
        fusion: A fusion module, or a factory called as ``fusion(d_model=embed_dim)`` (a Hydra
            partial). It maps ``(x [B,T,N,D], valid_mask=[B,T]|None)`` to ``(h, aux)``.
        head: A head module, or a factory called with ``embed_dim, num_classes,
            num_prefix_tokens, has_class_token`` (a Hydra partial).
        num_classes: Number of output classes.
    """

    def __init__(
        self,
        backbone: VideoBackbone,
        fusion: Callable[..., nn.Module] | nn.Module,
        head: Callable[..., nn.Module] | nn.Module,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.fusion = fusion if isinstance(fusion, nn.Module) else fusion(d_model=backbone.embed_dim)
        if isinstance(head, nn.Module):
            self.head = head
        else:
            try:
                self.head = head(
                    embed_dim=backbone.embed_dim,
                    num_classes=num_classes,
                    num_prefix_tokens=backbone.num_prefix_tokens,
                    has_class_token=backbone.has_class_token,
                )
            except ValueError as e:
                raise ValueError(f"backbone.name={backbone.name!r}: {e}") from e
        self.num_classes = num_classes

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel input mean expected by the backbone (0-1 pixel scale)."""
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel input std expected by the backbone (0-1 pixel scale)."""
        return self.backbone.std

    def _check_mask(self, video: Tensor, mask: Tensor | None) -> None:
        if mask is None:
            return
        if mask.shape != video.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the clip's [B,T]={tuple(video.shape[:2])}")
        # One host sync per step; an all-padding clip would otherwise yield arbitrary logits.
        # A data-dependent check: skipped while compiling, where it would break the graph.
        if not torch.compiler.is_compiling() and not bool(mask.to(torch.bool).any(dim=1).all()):
            raise ValueError("mask: every clip needs at least one valid frame")

    def forward_features(self, video: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns fused tokens ``h [B,T,N,D]`` and the fusion's aux statistics.

        Args:
            video: Normalised float clip ``[B,T,C,H,W]``.
            mask: Valid frames ``[B,T]`` (bool or 0/1), or None when all are valid.
        """
        self._check_mask(video, mask)
        tokens_BTND = self.backbone(video)
        return self.fusion(tokens_BTND, valid_mask=mask)

    def forward_head(self, h: Tensor, mask: Tensor | None = None, pre_logits: bool = False) -> Tensor:
        """Logits ``[B,num_classes]`` from fused tokens ``[B,T,N,D]``; with `pre_logits`, the
        pooled feature ``[B,D]`` the final linear layer reads (timm's convention)."""
        # Only asked for when wanted: a head without the keyword still classifies.
        return self.head(h, mask, pre_logits=True) if pre_logits else self.head(h, mask)

    def forward(self, video: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits ``[B,num_classes]`` for a normalised clip ``[B,T,C,H,W]``."""
        h_BTND, _ = self.forward_features(video, mask)
        return self.forward_head(h_BTND, mask)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any] | Callable[[str], Any]:
        """Layer groups for layer-wise lr decay.

        The backbone keeps timm's grouping (stem first, one group per block); fusion and head
        match nothing, which timm maps to the last group (lr scale 1): they are new layers.
        """
        return prefix_group_matcher(self.backbone.group_matcher(coarse=coarse), "backbone.")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names that must not get weight decay (timm fnmatch patterns)."""
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        for prefix, module in (("fusion", self.fusion), ("head", self.head)):
            if hasattr(module, "no_weight_decay"):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        # The fusion's residual gate is a learned scale, like a norm weight: decaying it would
        # pull the layer towards switching itself off.
        names |= {f"fusion.{n}" for n, _ in self.fusion.named_parameters() if n == "beta"}
        return names


def build_classifier(
    backbone_cfg: Mapping[str, Any],
    fusion_cfg: Mapping[str, Any],
    head_cfg: Mapping[str, Any],
    num_classes: int,
) -> VideoClassifier:
    """Instantiates a classifier from the ``backbone``, ``fusion`` and ``head`` config groups.

    Args:
        backbone_cfg: Config with ``_target_`` (a VideoBackbone) and its arguments.
        fusion_cfg: Partial config (``_partial_: true``), completed with ``d_model``.
        head_cfg: Partial config, completed with the backbone's token layout and num_classes.
        num_classes: Number of output classes.

    Returns:
        The classifier (on CPU, fp32).
    """
    backbone = hydra.utils.instantiate(backbone_cfg, _convert_="all")
    if not isinstance(backbone, VideoBackbone):
        raise ValueError(f"backbone._target_={backbone_cfg.get('_target_')!r} must build a VideoBackbone")
    fusion = hydra.utils.instantiate(fusion_cfg, _convert_="all")
    head = hydra.utils.instantiate(head_cfg, _convert_="all")
    return VideoClassifier(backbone=backbone, fusion=fusion, head=head, num_classes=num_classes)
