"""``fusion=temporal_attn``: self-attention over time for each token.

The "time" half of TimeSformer's divided space-time attention (Bertasius et al. 2021): for each
token position, pre-norm multi-head self-attention over the clip's frames with a learned temporal
position embedding, then an MLP, both residual. ``tokens=cls`` attends over the class token's
sequence only, the cheap late-fusion variant (ViViT's factorised encoder, Arnab et al. 2021).
As in TimeSformer the output projections start at zero, so the layer is the identity at step 0
and a pretrained image model is not disturbed.

The temporal position embedding starts random (``pos_init=trunc_normal``, std 0.02 as in
ViT/ViViT), not at zero as in TimeSformer (``pos_init=zeros``, kept as an option). With the
output projection at zero, no gradient reaches the attention or the embedding at step 0 either
way: the first steps learn through the output projection, whose gradient is computed from the
attention's output. With a zero embedding that output is blind to frame order (attention is
permutation-equivariant), so under an order-blind head (a mean over frames) every step-0
gradient is the same for a clip and its time reversal: order can enter only at second order,
from a saddle where both the embedding and the projection's order-dependent part are zero. A
random embedding makes the attention output order-dependent, and its gradient too, from step 0.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from squarefuse.models.fusion.common import ArgumentError, check_choice, check_int, check_shape, valid_btn

__all__ = ["TemporalAttention"]


class _TimeBlock(nn.Module):
    """Pre-norm attention over a sequence of frames + MLP; zero-initialised output layers."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = Mlp(d_model, hidden_features=max(1, round(mlp_ratio * d_model)), act_layer=nn.GELU)
        for layer in (self.proj, self.mlp.fc2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_SLD: Tensor, pos_SLD: Tensor, keys_S11L: Tensor | None) -> Tensor:
        """Args: sequences x [S,L,D], their position embeddings, keys taking part [S,1,1,L] or None."""
        S, L, D = x_SLD.shape
        qkv = self.qkv(self.norm1(x_SLD) + pos_SLD).reshape(S, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [S,H,L,hd]
        attn_SHLd = F.scaled_dot_product_attention(q, k, v, attn_mask=keys_S11L)
        x_SLD = x_SLD + self.proj(attn_SHLd.transpose(1, 2).reshape(S, L, D))
        return x_SLD + self.mlp(self.norm2(x_SLD))


class TemporalAttention(nn.Module):
    """Multi-head self-attention over time, per token (or for the class token only).

    Padded frames are masked out as keys and come back unchanged; positions are the ranks of
    the valid frames, so a padded clip gives, on its real frames, the unpadded clip's output.

    Args:
        d_model: Token width ``D``.
        depth: Number of attention + MLP blocks.
        heads: Attention heads; None uses ``D // 64`` (at least 1), ViT's head width.
        tokens: ``all`` (every token attends over its own frames) or ``cls`` (token 0 only, the
            class token; the other tokens pass through).
        mlp_ratio: Hidden width of the MLPs over ``D``.
        max_frames: Length of the learned temporal position embedding (frames per clip at most).
        pos_init: ``trunc_normal`` (std 0.02, the default: order-dependent from step 0) or
            ``zeros`` (TimeSformer's). Only the initial values differ; the state dict is the same.

    Raises:
        ArgumentError: (a ValueError) naming the ``fusion.*`` key of an invalid value.
    """

    def __init__(
        self,
        d_model: int,
        depth: int = 1,
        heads: int | None = None,
        tokens: str = "all",
        mlp_ratio: float = 4.0,
        max_frames: int = 64,
        pos_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        self.d_model = check_int(d_model, "d_model", minimum=1)
        depth = check_int(depth, "fusion.depth", minimum=1)
        heads = max(1, d_model // 64) if heads is None else check_int(heads, "fusion.heads", minimum=1)
        if d_model % heads:
            raise ArgumentError("fusion.heads", f"must divide d_model={d_model}, got {heads}")
        self.tokens = check_choice(tokens, "fusion.tokens", ("all", "cls"))
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or mlp_ratio <= 0:
            raise ArgumentError("fusion.mlp_ratio", f"must be a number > 0, got {mlp_ratio!r}")
        self.max_frames = check_int(max_frames, "fusion.max_frames", minimum=1)
        self.pos_init = check_choice(pos_init, "fusion.pos_init", ("trunc_normal", "zeros"))
        self.heads = heads
        self.pos_embed = nn.Parameter(torch.zeros(max_frames, d_model))
        if self.pos_init == "trunc_normal":
            # Bounds are absolute in torch; truncate at 2 std.
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        self.blocks = nn.ModuleList(_TimeBlock(d_model, heads, float(mlp_ratio)) for _ in range(depth))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, heads={self.heads}, tokens={self.tokens}, max_frames={self.max_frames}, "
            f"pos_init={self.pos_init}"
        )

    def no_weight_decay(self) -> set[str]:
        """Position embeddings get no weight decay (as timm's ``pos_embed``)."""
        return {"pos_embed"}

    def _attend(self, x_SLD: Tensor, valid_SL: Tensor | None) -> Tensor:
        S, L, _ = x_SLD.shape
        if valid_SL is None:
            pos_SLD = self.pos_embed[:L].expand(S, L, -1)
            keys_S11L = None
        else:
            rank_SL = (valid_SL.cumsum(dim=1) - 1).clamp_min(0)
            pos_SLD = self.pos_embed[rank_SL]
            # A sequence without any valid frame would give NaN rows; it is discarded anyway.
            keys_S11L = (valid_SL | ~valid_SL.any(dim=1, keepdim=True))[:, None, None, :]
        for block in self.blocks:
            x_SLD = block(x_SLD, pos_SLD, keys_S11L)
        return x_SLD

    def forward(self, x: Tensor, valid_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x [B,T,N,D]; valid_mask [B,T] or [B,T,N] (bool or 0/1) or None.

        Returns ``(h, {})``: ``h`` like ``x``, equal to ``x`` at invalid positions.
        """
        check_shape(x, self.d_model)
        B, T, N, D = x.shape
        if T > self.max_frames:
            raise ValueError(f"fusion.max_frames={self.max_frames} is smaller than the clip's {T} frames")
        valid_BTN = None if valid_mask is None else valid_btn(valid_mask, x)
        if self.tokens == "cls":
            cls_BTD = self._attend(x[:, :, 0], None if valid_BTN is None else valid_BTN[:, :, 0])
            h_BTND = torch.cat([cls_BTD[:, :, None], x[:, :, 1:]], dim=2)
        else:
            x_SLD = x.transpose(1, 2).reshape(B * N, T, D)
            valid_SL = None if valid_BTN is None else valid_BTN.transpose(1, 2).reshape(B * N, T)
            h_BTND = self._attend(x_SLD, valid_SL).reshape(B, N, T, D).transpose(1, 2)
        if valid_BTN is None:
            return h_BTND, {}
        return torch.where(valid_BTN[..., None], h_BTND, x), {}
