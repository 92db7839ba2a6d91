"""``fusion=temporal_shift``: TSM's temporal shift (Lin et al. 2019) followed by a residual MLP."""

from __future__ import annotations

import torch
from torch import Tensor

from squarefuse.models.fusion.common import ResidualTemporalMixer, check_int

__all__ = ["TemporalShift"]


class TemporalShift(ResidualTemporalMixer):
    """``h = x + MLP(shift(LayerNorm(x)))`` with TSM's shift along the valid frames.

    ``1/shift_div`` of the channels take the next valid frame's values (shifted one frame back),
    another ``1/shift_div`` the previous valid frame's (one frame forward), the rest stay in place;
    the clip's ends get zeros. The shift has no parameters, so the MLP (its output zero-initialised)
    gives the layer a parameter count comparable to the other fusions.

    Args:
        d_model: Token width ``D``.
        shift_div: ``1/shift_div`` of the channels move each way (TSM: 8).
        mlp_ratio: Hidden width of the MLP over ``D``.
    """

    def __init__(self, d_model: int, shift_div: int = 8, mlp_ratio: float = 4.0) -> None:
        super().__init__(d_model, mlp_ratio)
        self.shift_div = check_int(shift_div, "fusion.shift_div", minimum=2)
        self.fold = d_model // self.shift_div

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, shift_div={self.shift_div}"

    def mix(self, z_BTND: Tensor) -> Tensor:
        f = self.fold
        zero_B1ND = z_BTND.new_zeros(z_BTND.shape[0], 1, *z_BTND.shape[2:])
        back_BTND = torch.cat([z_BTND[:, 1:], zero_B1ND], dim=1)  # frame t gets frame t+1
        forward_BTND = torch.cat([zero_B1ND, z_BTND[:, :-1]], dim=1)  # frame t gets frame t-1
        return torch.cat([back_BTND[..., :f], forward_BTND[..., f : 2 * f], z_BTND[..., 2 * f :]], dim=-1)
