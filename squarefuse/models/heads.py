"""Classification heads: pool fused tokens ``[B,T,N,D]`` over valid frames -> logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ClsHead", "MeanHead", "masked_mean_over_time"]

# Small init keeps the initial logits near zero so the loss starts at log(num_classes).
HEAD_INIT_STD = 0.02


def masked_mean_over_time(x_BTD: Tensor, mask_BT: Tensor | None) -> Tensor:
    """Averages ``x`` over the valid frames of each clip.

    Padded frames are replaced by zeros with ``where`` (not multiplied by the mask), so any
    content in them, NaN or inf included, leaves the average untouched.

    Args:
        x_BTD: Features per frame ``[B,T,D]``.
        mask_BT: Valid frames ``[B,T]`` (bool or 0/1), or None when every frame is valid.

    Returns:
        ``[B,D]``. A clip without valid frames gives zeros.
    """
    if mask_BT is None:
        return x_BTD.mean(dim=1)
    if mask_BT.shape != x_BTD.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask_BT.shape)} does not match the clip's [B,T]={tuple(x_BTD.shape[:2])}")
    valid_BT = mask_BT.to(torch.bool)
    summed_BD = torch.where(valid_BT[..., None], x_BTD, 0.0).sum(dim=1)
    count_B1 = valid_BT.sum(dim=1, keepdim=True).clamp_min(1).to(x_BTD.dtype)
    return summed_BD / count_B1


class _LinearHead(nn.Module):
    """LayerNorm -> dropout -> linear classifier on a pooled feature ``[B,D]``.

    Every head takes the same arguments, so that the classifier builds any of them from the config.

    Args:
        embed_dim: Token width D.
        num_classes: Number of output classes.
        num_prefix_tokens: Prefix tokens (class/registers) before the patch tokens.
        has_class_token: Whether token 0 is a class token (required by heads that read it).
        dropout: Dropout before the classifier.
    """

    reads_class_token = False

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        num_prefix_tokens: int,
        has_class_token: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if self.reads_class_token and not has_class_token:
            raise ValueError(
                "head=cls needs a backbone with a class token, but this backbone has none "
                "(has_class_token=False); use head=mean."
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1), got {dropout}")
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = nn.LayerNorm(embed_dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, num_classes)
        # Bounds are absolute in torch; truncate at 2 std, not at +-2.
        nn.init.trunc_normal_(self.fc.weight, std=HEAD_INIT_STD, a=-2 * HEAD_INIT_STD, b=2 * HEAD_INIT_STD)
        nn.init.zeros_(self.fc.bias)

    def classify(self, pooled_BD: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits [B,C]; with `pre_logits`, the feature the final linear layer reads [B,D]."""
        features_BD = self.drop(self.norm(pooled_BD))
        return features_BD if pre_logits else self.fc(features_BD)


class ClsHead(_LinearHead):
    """Class token (index 0) averaged over valid frames -> linear classifier (arguments: `_LinearHead`)."""

    reads_class_token = True

    def forward(self, h_BTND: Tensor, mask_BT: Tensor | None = None, pre_logits: bool = False) -> Tensor:
        """Args: h_BTND fused tokens, mask_BT valid frames or None. Returns logits [B,C] (or
        the pre-logits feature [B,D] with `pre_logits`)."""
        return self.classify(masked_mean_over_time(h_BTND[:, :, 0], mask_BT), pre_logits)


class MeanHead(_LinearHead):
    """Patch tokens (after the prefix tokens) averaged over valid frames and all positions -> linear classifier
    (arguments: `_LinearHead`)."""

    def forward(self, h_BTND: Tensor, mask_BT: Tensor | None = None, pre_logits: bool = False) -> Tensor:
        """Args: h_BTND fused tokens, mask_BT valid frames or None. Returns logits [B,C] (or
        the pre-logits feature [B,D] with `pre_logits`)."""
        patches_BTD = h_BTND[:, :, self.num_prefix_tokens :].mean(dim=2)
        return self.classify(masked_mean_over_time(patches_BTD, mask_BT), pre_logits)
