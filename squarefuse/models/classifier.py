"""The video classifier: per-frame backbone -> temporal fusion -> head.

The fusion sits after the backbone (``fusion``, the default) and/or after chosen backbone blocks
(``block_fusions``, one layer with its own parameters per block). The classifier's top-level
children are ``backbone``, ``fusion``, ``block_fusions`` and ``head``.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import hydra.utils
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from squarefuse.models.backbone import VideoBackbone, prefix_group_matcher
from squarefuse.models.cached_tokens import CachedTokens
from squarefuse.models.fusion import NoFusion
from squarefuse.models.pixels import PixelFrames

__all__ = ["HEAD_INPUTS", "VideoClassifier", "build_classifier", "split_fusion_config"]


class VideoClassifier(nn.Module):
    """Backbone on every frame, fusion over time, head on the fused tokens.

    Padded frames (mask False) never change the logits: the backbone treats frames
    independently, the fusion ignores them and the head averages over valid frames only.

    Args:
        backbone: The per-frame backbone.
        fusion: A fusion module, or a factory called as ``fusion(d_model=embed_dim)`` (a Hydra
            partial; a layer whose class sets ``takes_num_tokens`` also gets the backbone's token
            count ``num_tokens``). It maps ``(x [B,T,N,D], valid_mask=[B,T]|None)`` to ``(h, aux)``.
        head: A head module, or a factory (a Hydra partial of the ``head`` config, which holds the
            head's own arguments) called with those of ``embed_dim, num_classes, num_prefix_tokens,
            has_class_token, num_tokens`` that its signature names (`HEAD_INPUTS`).
        num_classes: Number of output classes.
        fusion_after_backbone: Put a fusion layer on the backbone's output tokens (``fusion``);
            if False, ``fusion`` is a ``NoFusion`` and only ``fusion_after_blocks`` fuse.
        fusion_after_blocks: Backbone block indices each followed by a fusion layer of its own
            (``block_fusions[str(index)]``); ``fusion`` must then be a factory.
    """

    def __init__(
        self,
        backbone: VideoBackbone | CachedTokens | PixelFrames,
        fusion: Callable[..., nn.Module] | nn.Module,
        head: Callable[..., nn.Module] | nn.Module,
        num_classes: int,
        fusion_after_backbone: bool = True,
        fusion_after_blocks: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        after_blocks = _check_after_blocks(fusion_after_blocks, backbone)
        if not isinstance(fusion_after_backbone, bool):
            raise ValueError(f"fusion.after_backbone must be true or false, got {fusion_after_backbone!r}")
        if not fusion_after_backbone and not after_blocks:
            raise ValueError(
                "fusion.after_backbone=false with fusion.after_blocks=[] places no fusion layer; "
                "use fusion=none for a model without temporal fusion"
            )
        if after_blocks and isinstance(fusion, nn.Module):
            raise ValueError("fusion after blocks needs a fusion factory (one layer per block), got a module")
        if not fusion_after_backbone:
            self.fusion = NoFusion(d_model=backbone.embed_dim)
        else:
            self.fusion = fusion if isinstance(fusion, nn.Module) else _build_layer(fusion, backbone)
        # Keys are block indices as strings (ModuleDict keys must be); an empty dict adds no state.
        self.block_fusions = nn.ModuleDict({str(index): _build_layer(fusion, backbone) for index in after_blocks})
        for layer in (self.fusion, *self.block_fusions.values()):
            if getattr(layer, "tokens", None) == "cls" and not backbone.has_class_token:
                raise ValueError(
                    f"fusion.tokens=cls needs a backbone with a class token; backbone.name={backbone.name!r} has none"
                )
        if isinstance(head, nn.Module):
            self.head = head
        else:
            try:
                self.head = _build_head(head, backbone, num_classes)
            except ValueError as e:
                raise ValueError(f"backbone.name={backbone.name!r}: {e}") from e
        self.num_classes = num_classes

    @property
    def mean(self) -> tuple[float, float, float] | None:
        """Per-channel input mean expected by the backbone (0-1 pixel scale); None for cached tokens."""
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, float, float] | None:
        """Per-channel input std expected by the backbone (0-1 pixel scale); None for cached tokens."""
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
        """Returns fused tokens ``h [B,T,N,D]`` and the fusions' aux statistics.

        ``aux`` holds the keys of the layer after the backbone as they are, and those of the
        layer after block ``i`` as ``block{i}.<key>``.

        Args:
            video: Normalised float clip ``[B,T,C,H,W]``.
            mask: Valid frames ``[B,T]`` (bool or 0/1), or None when all are valid.
        """
        self._check_mask(video, mask)
        block_aux: dict[str, Tensor] = {}

        def fuse_after(index: str) -> Callable[[Tensor], Tensor]:
            def fuse(tokens_BTND: Tensor) -> Tensor:
                h_BTND, aux = self.block_fusions[index](tokens_BTND, valid_mask=mask)
                block_aux.update({f"block{index}.{key}": value for key, value in aux.items()})
                return h_BTND

            return fuse

        after_block = {int(index): fuse_after(index) for index in self.block_fusions}
        tokens_BTND = self.backbone(video, after_block=after_block or None)
        h_BTND, aux = self.fusion(tokens_BTND, valid_mask=mask)
        return h_BTND, {**aux, **block_aux}

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

        The backbone keeps timm's grouping (stem first, one group per block); a layer inserted
        after block ``i`` joins block ``i``'s group (same lr scale); fusion and head match
        nothing, which timm maps to the last group (lr scale 1): they are new layers.
        """
        matcher = prefix_group_matcher(self.backbone.group_matcher(coarse=coarse), "backbone.")
        if len(self.block_fusions) == 0:
            return matcher
        # Insertion needs a timm VisionTransformer, whose matcher is a dict whose "blocks" regex
        # (or first regex of a list of (regex, suffix)) captures the block index.
        assert isinstance(matcher, dict) and "blocks" in matcher, matcher
        blocks = matcher["blocks"]
        blocks = [(blocks, None)] if isinstance(blocks, str) else list(blocks)
        return {**matcher, "blocks": [(r"^block_fusions\.(\d+)\.", None), *blocks]}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names that must not get weight decay (timm fnmatch patterns)."""
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        modules = {"fusion": self.fusion, "head": self.head}
        modules |= {f"block_fusions.{index}": layer for index, layer in self.block_fusions.items()}
        for prefix, module in modules.items():
            if hasattr(module, "no_weight_decay"):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        return names


def _build_layer(factory: Callable[..., nn.Module], backbone: nn.Module) -> nn.Module:
    """A fusion layer from its factory: ``d_model``, and the token count for a layer laid out per position."""
    # A Hydra partial is a functools.partial of the layer's class (`func`); a plain factory is its own target.
    if getattr(getattr(factory, "func", factory), "takes_num_tokens", False):
        return factory(d_model=backbone.embed_dim, num_tokens=backbone.num_tokens)
    return factory(d_model=backbone.embed_dim)


# What only the classifier knows of a head's input: the backbone's token layout and the class count.
HEAD_INPUTS = ("embed_dim", "num_classes", "num_prefix_tokens", "has_class_token", "num_tokens")


def _build_head(factory: Callable[..., nn.Module], backbone: nn.Module, num_classes: int) -> nn.Module:
    """A head from its factory (its own arguments bound), given the `HEAD_INPUTS` its signature names.

    A head that takes ``**kwargs`` gets them all; the others only the ones they declare, so a head
    needs neither a change here nor arguments it does not use.
    """
    known = {
        "embed_dim": backbone.embed_dim,
        "num_classes": num_classes,
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "has_class_token": backbone.has_class_token,
        "num_tokens": backbone.num_tokens,
    }
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return factory(**known)
    return factory(**{name: value for name, value in known.items() if name in parameters})


def _check_after_blocks(after_blocks: Sequence[int], backbone: VideoBackbone) -> list[int]:
    """Sorted block indices, after checking them against the backbone (ValueError naming the key)."""
    key = "fusion.after_blocks"
    if isinstance(after_blocks, (str, bytes)) or not isinstance(after_blocks, Sequence):
        raise ValueError(f"{key} must be a list of block indices, got {after_blocks!r}")
    if not after_blocks:
        return []
    if backbone.num_blocks is None:
        raise ValueError(
            f"{key}={list(after_blocks)}: inserting fusion layers needs a timm VisionTransformer backbone "
            f"(vit_*, deit_*); backbone.name={backbone.name!r} is not one"
        )
    for index in after_blocks:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < backbone.num_blocks:
            raise ValueError(
                f"{key}={list(after_blocks)}: {index!r} is not a block index of backbone.name={backbone.name!r} "
                f"(0..{backbone.num_blocks - 1})"
            )
    if len(set(after_blocks)) != len(after_blocks):
        raise ValueError(f"{key}={list(after_blocks)} names a block twice")
    return sorted(int(index) for index in after_blocks)


def build_classifier(
    backbone_cfg: Mapping[str, Any],
    fusion_cfg: Mapping[str, Any],
    head_cfg: Mapping[str, Any],
    num_classes: int,
) -> VideoClassifier:
    """Instantiates a classifier from the ``backbone``, ``fusion`` and ``head`` config groups.

    Args:
        backbone_cfg: Config with ``_target_`` (a VideoBackbone) and its arguments.
        fusion_cfg: Partial config (``_partial_: true``), completed with ``d_model``; its placement
            keys ``after_backbone`` and ``after_blocks`` go to the classifier, not the layer.
        head_cfg: The head's config: ``_target_`` and the head's own arguments (``_partial_`` is
            implied), completed with the backbone's token layout and num_classes (`HEAD_INPUTS`).
        num_classes: Number of output classes.

    Returns:
        The classifier (on CPU, fp32).
    """
    backbone = hydra.utils.instantiate(backbone_cfg, _convert_="all")
    if not isinstance(backbone, (VideoBackbone, CachedTokens, PixelFrames)):
        raise ValueError(
            f"backbone._target_={backbone_cfg.get('_target_')!r} must build a VideoBackbone (or CachedTokens, "
            "PixelFrames)"
        )
    layer_cfg, placement = split_fusion_config(fusion_cfg)
    fusion = hydra.utils.instantiate(layer_cfg, _convert_="all")
    # A partial whatever the config says: the classifier adds what only it knows (`_build_head`).
    head = hydra.utils.instantiate(head_cfg, _partial_=True, _convert_="all")
    return VideoClassifier(
        backbone=backbone,
        fusion=fusion,
        head=head,
        num_classes=num_classes,
        fusion_after_backbone=placement["after_backbone"],
        fusion_after_blocks=placement["after_blocks"],
    )


def split_fusion_config(fusion_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits the ``fusion`` config group into the layer's config and its placement.

    Returns:
        ``(layer_cfg, placement)``: ``layer_cfg`` (a plain dict, for ``hydra.utils.instantiate``)
        without the placement keys; ``placement`` holds ``after_backbone`` and ``after_blocks``,
        defaulting to the single layer after the backbone for runs saved before these keys existed.
    """
    # Resolved: a layer may take a value from elsewhere in the config (joint_mlp: dataset.num_frames).
    layer_cfg = (
        OmegaConf.to_container(fusion_cfg, resolve=True) if isinstance(fusion_cfg, DictConfig) else dict(fusion_cfg)
    )
    placement = {
        "after_backbone": layer_cfg.pop("after_backbone", True),
        "after_blocks": layer_cfg.pop("after_blocks", []),
    }
    return layer_cfg, placement
