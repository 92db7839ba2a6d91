"""What every fusion layer shares: argument checks, the valid-frame mask, packing valid frames.

Every layer is called as ``h, aux = fusion(x [B,T,N,D], valid_mask=[B,T]|[B,T,N]|None)`` and
obeys one masking rule: invalid frames are ignored as if the clip consisted of its valid frames
only, and come back unchanged. Layers that mix neighbouring frames (shift, convolution) get that
by packing each sequence's valid frames to the front (``pack_valid``), working on the packed
sequence with zeros after its end, and scattering the result back (``unpack_valid``).
"""

from __future__ import annotations

import abc
import numbers

import torch
from timm.layers import Mlp
from torch import Tensor, nn

__all__ = [
    "ArgumentError",
    "check_int",
    "check_choice",
    "check_shape",
    "valid_btn",
    "pack_valid",
    "unpack_valid",
    "ResidualTemporalMixer",
]


class ArgumentError(ValueError):
    """A user mistake in one argument; ``key`` names it so that a builder can rename it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key = key
        self.problem = problem


def check_int(value: object, key: str, *, minimum: int) -> int:
    """Returns ``value`` as int; raises ArgumentError unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ArgumentError(key, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(value: object, key: str, choices: tuple[str, ...]) -> str:
    """Returns ``value``; raises ArgumentError unless it is one of ``choices``."""
    if value not in choices:
        raise ArgumentError(key, f"must be one of {'|'.join(choices)}, got {value!r}")
    return str(value)


def check_shape(x: Tensor, d_model: int) -> None:
    """Raises ValueError unless ``x`` is [B,T,N,D] with ``D = d_model``."""
    if x.dim() != 4 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape [B,T,N,D] with D={d_model}, got {list(x.shape)}")


def valid_btn(valid_mask: Tensor, x: Tensor) -> Tensor:
    """Boolean validity [B,T,N] from a [B,T] or [B,T,N] bool or 0/1 mask for ``x`` [B,T,N,D]."""
    B, T, N, _ = x.shape
    if tuple(valid_mask.shape) == (B, T):
        valid_mask = valid_mask[:, :, None].expand(B, T, N)
    elif tuple(valid_mask.shape) != (B, T, N):
        raise ValueError(
            f"valid_mask must have shape [B,T]=[{B},{T}] or [B,T,N]=[{B},{T},{N}] for x of "
            f"shape {list(x.shape)}, got {list(valid_mask.shape)}"
        )
    return valid_mask != 0


def pack_valid(x_BTNC: Tensor, valid_BTN: Tensor) -> tuple[Tensor, Tensor]:
    """Moves each sequence's valid frames to the front, in order, and zeros the rest.

    Args:
        x_BTNC: Values [B,T,N,C].
        valid_BTN: Boolean validity [B,T,N].

    Returns:
        ``(packed [B,T,N,C], order [B,T,N])``: ``packed[:, i]`` is the i-th valid frame of its
        sequence (zeros beyond its number of valid frames), and ``order`` the frame it came from,
        for ``unpack_valid``.
    """
    # A stable sort of "is padding" keeps the valid frames in time order ahead of the padding.
    order_BTN = torch.sort((~valid_BTN).to(torch.uint8), dim=1, stable=True).indices
    packed_BTNC = torch.gather(x_BTNC, 1, order_BTN[..., None].expand_as(x_BTNC))
    packed_valid_BTN = torch.gather(valid_BTN, 1, order_BTN)
    # where, not a product: padding may hold anything, NaN included.
    return torch.where(packed_valid_BTN[..., None], packed_BTNC, 0.0), order_BTN


def unpack_valid(packed_BTNC: Tensor, order_BTN: Tensor) -> Tensor:
    """Inverse of ``pack_valid``: every packed frame goes back to the frame it came from."""
    out_BTNC = torch.empty_like(packed_BTNC)
    return out_BTNC.scatter(1, order_BTN[..., None].expand_as(packed_BTNC), packed_BTNC)


class ResidualTemporalMixer(nn.Module, abc.ABC):
    """``h = x + MLP(mix_time(LayerNorm(x)))`` on valid frames; the base of shift and conv.

    ``mix_time`` (a subclass's ``mix``) sees each sequence's valid frames packed to the front and
    zeros after them, so it mixes neighbouring *valid* frames and the clip's ends look like zero
    padding whatever the mask. The MLP's output layer starts at zero: the layer is the identity
    at step 0 and does not disturb a pretrained image model.

    Args:
        d_model: Token width ``D``.
        mlp_ratio: Hidden width of the MLP over ``D``.
    """

    def __init__(self, d_model: int, mlp_ratio: float) -> None:
        super().__init__()
        self.d_model = check_int(d_model, "d_model", minimum=1)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or mlp_ratio <= 0:
            raise ArgumentError("fusion.mlp_ratio", f"must be a number > 0, got {mlp_ratio!r}")
        self.norm = nn.LayerNorm(d_model)
        self.mlp = Mlp(d_model, hidden_features=max(1, round(mlp_ratio * d_model)), act_layer=nn.GELU)
        nn.init.zeros_(self.mlp.fc2.weight)
        nn.init.zeros_(self.mlp.fc2.bias)

    @abc.abstractmethod
    def mix(self, z_BTND: Tensor) -> Tensor:
        """Mixes packed sequences over time (dim 1); zeros after each sequence's end."""

    def forward(self, x: Tensor, valid_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: x [B,T,N,D]; valid_mask [B,T] or [B,T,N] (bool or 0/1) or None.

        Returns ``(h, {})``: ``h`` like ``x``, equal to ``x`` at invalid positions.
        """
        check_shape(x, self.d_model)
        z_BTND = self.norm(x)
        if valid_mask is None:
            return x + self.mlp(self.mix(z_BTND)), {}
        valid_BTN = valid_btn(valid_mask, x)
        packed_BTND, order_BTN = pack_valid(z_BTND, valid_BTN)
        update_BTND = unpack_valid(self.mlp(self.mix(packed_BTND)), order_BTN)
        return torch.where(valid_BTN[..., None], x + update_BTND, x), {}
