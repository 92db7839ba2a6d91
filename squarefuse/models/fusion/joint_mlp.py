"""``fusion=joint_mlp``: the temporal benchmark's token control, an MLP over every token of the clip at once.

Not a temporal fusion to compare with the others but a positive control (DESIGN.md section 9): a
model on the same cached tokens that can mix all positions and all frames. Where it cannot reach
high accuracy, the tokens may not carry the answer, and a fusion that fails the task says nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from squarefuse.models.fusion.common import check_int, check_shape, valid_btn

__all__ = ["JointMLP"]

# ViT's initialisation (truncated normal, std 0.02, zero bias) for every linear layer: the control
# must learn from step 0, so no zero-initialised output (DESIGN.md section 9: init is part of a baseline).
INIT_STD = 0.02


class JointMLP(nn.Module):
    """``h = x + g`` on every valid token, ``g [B,D]`` an MLP of all the clip's valid tokens flattened.

    ``z = LayerNorm(x)``, ``u = Linear(D -> d_token)(z)`` per token, set to zero at padded
    frames/tokens; ``u [B,T,N,d_token]`` flattened to ``[B, T*N*d_token]`` goes through
    ``Linear -> GELU -> Linear`` (``hidden`` wide) to one vector ``g [B,D]``, added to every valid
    token, so that any head (mean, class token, attentive) reads what the MLP computed; padded
    tokens come back unchanged. A per-token output instead of one broadcast ``g`` would give a mean
    or class-token head nothing more (their pooled feature is still a linear map of the hidden layer).

    The first layer has one weight per frame index and token position: the layer is built for
    exactly ``num_frames`` frames and ``num_tokens`` tokens. Padded frames enter as zeros at their
    own frame index, so (unlike the other fusions) a clip padded at the end is not read as the
    shorter clip moved to other frame indices; the output is deterministic, and what padded
    frames hold (NaN included) never changes the output at valid frames.

    Args:
        d_model: Token width ``D``.
        num_frames: Frames per clip ``T`` (the config passes ``dataset.num_frames``).
        num_tokens: Tokens per frame ``N`` (the classifier passes the backbone's).
        d_token: Width each token is projected to before flattening.
        hidden: Hidden width of the MLP over the flattened clip.
    """

    takes_num_tokens = True  # `VideoClassifier` passes the backbone's token count N

    def __init__(self, d_model: int, num_frames: int, num_tokens: int, d_token: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.d_model = check_int(d_model, "d_model", minimum=1)
        self.num_frames = check_int(num_frames, "fusion.num_frames", minimum=1)
        self.num_tokens = check_int(num_tokens, "num_tokens", minimum=1)
        self.d_token = check_int(d_token, "fusion.d_token", minimum=1)
        self.hidden = check_int(hidden, "fusion.hidden", minimum=1)
        self.norm = nn.LayerNorm(d_model)
        self.down = nn.Linear(d_model, d_token)
        self.fc1 = nn.Linear(num_frames * num_tokens * d_token, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)
        for layer in (self.down, self.fc1, self.fc2):
            nn.init.trunc_normal_(layer.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            nn.init.zeros_(layer.bias)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_frames={self.num_frames}, num_tokens={self.num_tokens}, "
            f"d_token={self.d_token}, hidden={self.hidden}"
        )

    def forward(self, x: Tensor, valid_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x [B,T,N,D]; valid_mask [B,T] or [B,T,N] (bool or 0/1) or None.

        Returns ``(h, {})``: ``h`` like ``x``, equal to ``x`` at invalid positions.
        """
        check_shape(x, self.d_model)
        B, T, N, _ = x.shape
        if (T, N) != (self.num_frames, self.num_tokens):
            raise ValueError(
                f"fusion=joint_mlp was built for clips of {self.num_frames} frames x {self.num_tokens} tokens "
                f"(dataset.num_frames and the backbone's tokens), got {T} x {N}: its weights are laid out per "
                "frame and position, so train it with the frames and backbone it is evaluated with"
            )
        if valid_mask is None:
            valid_BTN = torch.ones(B, T, N, dtype=torch.bool, device=x.device)
        else:
            valid_BTN = valid_btn(valid_mask, x)
        # Zeroed before the norm as well as after the projection: padding may hold anything, NaN
        # included, and a NaN even behind a `where` would reach the norm's weight gradient.
        x_valid = torch.where(valid_BTN[..., None], x, 0.0)
        u_BTNC = torch.where(valid_BTN[..., None], self.down(self.norm(x_valid)), 0.0)
        g_BD = self.fc2(self.act(self.fc1(u_BTNC.reshape(B, -1))))
        return torch.where(valid_BTN[..., None], x + g_BD[:, None, None, :], x), {}
