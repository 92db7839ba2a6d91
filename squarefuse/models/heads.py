"""Classification heads: pool fused tokens ``[B,T,N,D]`` over valid frames -> logits.

``mean`` and ``cls`` average (order-blind, and blind to where a token sits); ``attentive`` reads
out with a learned query that attends over every token, and can compare positions and, with
``pos_embed=space_time``, frames.
"""

from __future__ import annotations

import numbers

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from squarefuse.models.fusion.common import ArgumentError, check_choice, check_int, valid_btn

__all__ = ["AttentiveHead", "ClsHead", "MeanHead", "masked_mean_over_time"]

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

    The classifier gives a head those of its input arguments (`classifier.HEAD_INPUTS`) that its
    signature names; the others (dropout...) come from the head's config.

    Args:
        embed_dim: Token width D.
        num_classes: Number of output classes.
        num_prefix_tokens: Prefix tokens (class/registers) before the patch tokens.
        has_class_token: Whether token 0 is a class token (required by heads that read it).
        dropout: Dropout before the classifier.
    """

    reads_class_token = False
    # Pools the patch tokens (those after the prefix tokens): a backbone must give some (asked by
    # `check_train_config`, which names the data; a token cache of prefix tokens only has none).
    reads_patch_tokens = False

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

    reads_patch_tokens = True

    def forward(self, h_BTND: Tensor, mask_BT: Tensor | None = None, pre_logits: bool = False) -> Tensor:
        """Args: h_BTND fused tokens, mask_BT valid frames or None. Returns logits [B,C] (or
        the pre-logits feature [B,D] with `pre_logits`)."""
        patches_BTD = h_BTND[:, :, self.num_prefix_tokens :].mean(dim=2)
        return self.classify(masked_mean_over_time(patches_BTD, mask_BT), pre_logits)


class _CrossAttentionBlock(nn.Module):
    """The query attends over the tokens (pre-norm on the tokens, residual), then an MLP (pre-norm, residual).

    Computed for one query without projecting every token: per head, the score of token x is
    ``q . (W_k x + b_k) = (W_k^T q) . x + q . b_k`` and the output ``sum_s a_s (W_v x_s + b_v) =
    W_v (sum_s a_s x_s) + b_v`` (the weights a_s sum to 1), so the query goes through W_k once and the
    attention-weighted token through W_v once: S x D work per head instead of S x D x D, the same
    function and parameters (`kv` holds W_k, W_v as one layer, as timm's attention does). ``q . b_k`` is
    the same for every token and the softmax ignores it: the key bias never changes the output.
    """

    def __init__(self, d_model: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = Mlp(d_model, hidden_features=max(1, round(mlp_ratio * d_model)), act_layer=nn.GELU)

    def forward(
        self, query_B1D: Tensor, tokens_BSD: Tensor, pos_BSD: Tensor | None, keys_B11S: Tensor | None
    ) -> Tensor:
        """Args: the query [B,1,D], the tokens [B,S,D], their position embeddings (broadcastable) or
        None, the keys taking part [B,1,1,S] (bool) or None."""
        B, S, D = tokens_BSD.shape
        H, hd = self.heads, D // self.heads
        x_BSD = self.norm1(tokens_BSD)
        if pos_BSD is not None:
            x_BSD = x_BSD + pos_BSD
        w_k_HdD, w_v_HdD = self.kv.weight.reshape(2, H, hd, D).unbind(0)
        q_BHd = self.q(query_B1D).reshape(B, H, hd)
        query_keys_BHD = torch.einsum("bhk,hkd->bhd", q_BHd, w_k_HdD) * hd**-0.5  # W_k^T q, scaled
        scores_BHS = query_keys_BHD @ x_BSD.transpose(1, 2)
        if keys_B11S is not None:
            scores_BHS = scores_BHS.masked_fill(~keys_B11S[:, 0], float("-inf"))
        attended_BHD = scores_BHS.softmax(dim=-1) @ x_BSD  # the attention-weighted token, per head
        values_BHd = torch.einsum("bhd,hkd->bhk", attended_BHD, w_v_HdD) + self.kv.bias[D:].reshape(H, hd)
        query_B1D = query_B1D + self.proj(values_BHd.reshape(B, 1, D))
        return query_B1D + self.mlp(self.norm2(query_B1D))


class AttentiveHead(_LinearHead):
    """Attentive probe (V-JEPA's, Bardes et al. 2024): a learned query cross-attends over all
    ``T x N`` fused tokens (class/register tokens included), then LayerNorm -> dropout -> linear.

    A mean over tokens cannot compare positions (a flash on the left then on the right averages to
    the reverse order's mean); attention weights that depend on each token's content and position
    can. Without position embeddings the probe is still blind to frame order (V-JEPA's default for
    image backbones): ``pos_embed=space_time`` adds a learned embedding per frame and per token
    index to the tokens the keys and values are computed from. Padded frames are masked out of
    the keys, and frames are numbered by their rank among the valid frames, so a clip of L real
    frames padded to T gives the unpadded L-frame clip's logits.

    Args (besides `_LinearHead`'s):
        depth: Cross-attention blocks, each re-reading the tokens with the updated query.
        mlp_ratio: Hidden width of the blocks' MLPs over ``D``.
        num_heads: Attention heads; None uses ``D // 64`` (at least 1), ViT's head width.
        pos_embed: ``none`` or ``space_time``.
        max_frames: Frames per clip at most (length of the time embedding, with ``space_time``).
        max_tokens: Tokens per frame at most (length of the space embedding, with ``space_time``).

    Raises:
        ArgumentError: (a ValueError) naming the ``head.*`` key of an invalid value.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        num_prefix_tokens: int,
        has_class_token: bool,
        dropout: float = 0.0,
        depth: int = 1,
        mlp_ratio: float = 4.0,
        num_heads: int | None = None,
        pos_embed: str = "none",
        max_frames: int = 64,
        max_tokens: int = 1024,
    ) -> None:
        super().__init__(embed_dim, num_classes, num_prefix_tokens, has_class_token, dropout)
        depth = check_int(depth, "head.depth", minimum=1)
        heads = max(1, embed_dim // 64) if num_heads is None else check_int(num_heads, "head.num_heads", minimum=1)
        if embed_dim % heads:
            raise ArgumentError("head.num_heads", f"must divide the token width {embed_dim}, got {heads}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or mlp_ratio <= 0:
            raise ArgumentError("head.mlp_ratio", f"must be a number > 0, got {mlp_ratio!r}")
        self.pos_embed = check_choice(pos_embed, "head.pos_embed", ("none", "space_time"))
        self.max_frames = check_int(max_frames, "head.max_frames", minimum=1)
        self.max_tokens = check_int(max_tokens, "head.max_tokens", minimum=1)
        self.num_heads = heads
        init = dict(std=HEAD_INIT_STD, a=-2 * HEAD_INIT_STD, b=2 * HEAD_INIT_STD)
        # A small random query starts the attention near uniform: the probe starts as a mean over tokens.
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, embed_dim), **init))
        self.blocks = nn.ModuleList(_CrossAttentionBlock(embed_dim, heads, float(mlp_ratio)) for _ in range(depth))
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, **init)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            # V-JEPA's rescaling of the residual branches' last layers (depth 1: by sqrt(2)).
            for layer in (block.proj, block.mlp.fc2):
                layer.weight.data.div_(2**0.5)
        if self.pos_embed == "space_time":
            # Random, not zero: they feed the attention logits directly and get a gradient from step 0.
            self.time_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(max_frames, embed_dim), **init))
            self.space_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(max_tokens, embed_dim), **init))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, depth={len(self.blocks)}, pos_embed={self.pos_embed}"

    def no_weight_decay(self) -> set[str]:
        """The query and position embeddings get no weight decay (as timm's ``cls_token`` and ``pos_embed``)."""
        return {"query", "time_embed", "space_embed"} if self.pos_embed == "space_time" else {"query"}

    def _positions(self, valid_BTN: Tensor | None, T: int, N: int) -> Tensor:
        """Time + space embedding per token, [B or 1, T*N, D]; frames numbered by their rank among the valid ones."""
        if T > self.max_frames or N > self.max_tokens:
            raise ValueError(
                f"head.max_frames={self.max_frames} and head.max_tokens={self.max_tokens} must cover the "
                f"clip's {T} frames of {N} tokens; raise them"
            )
        if valid_BTN is None:
            time_1TND = self.time_embed[:T, None].expand(1, T, N, -1)
        else:
            rank_BTN = (valid_BTN.cumsum(dim=1) - 1).clamp_min(0)
            time_1TND = self.time_embed[rank_BTN]
        pos = time_1TND + self.space_embed[:N]
        return pos.flatten(1, 2)

    def forward(self, h_BTND: Tensor, mask: Tensor | None = None, pre_logits: bool = False) -> Tensor:
        """Args: h_BTND fused tokens; mask valid frames [B,T] or tokens [B,T,N] (bool or 0/1), or None.
        Returns logits [B,C] (or the pre-logits feature [B,D] with `pre_logits`)."""
        B, T, N, D = h_BTND.shape
        valid_BTN = None if mask is None else valid_btn(mask, h_BTND)
        tokens_BSD = h_BTND.reshape(B, T * N, D)
        keys_B11S = None
        if valid_BTN is not None:
            valid_BS = valid_BTN.reshape(B, T * N)
            # `where`, not a product: NaN or inf in a padded frame must not reach the values.
            tokens_BSD = torch.where(valid_BS[..., None], tokens_BSD, 0.0)
            # A clip without any valid token would give NaN; it reads all (zeroed) tokens instead.
            keys_B11S = (valid_BS | ~valid_BS.any(dim=1, keepdim=True))[:, None, None, :]
        pos_BSD = None if self.pos_embed == "none" else self._positions(valid_BTN, T, N)
        query_B1D = self.query.expand(B, 1, D)
        for block in self.blocks:
            query_B1D = block(query_B1D, tokens_BSD, pos_BSD, keys_B11S)
        return self.classify(query_B1D[:, 0], pre_logits)
