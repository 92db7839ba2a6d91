"""``fusion=temporal_conv``: a depthwise 1-D convolution over time followed by a residual MLP.

The temporal part of the video adapters of AIM and ST-Adapter, as a fusion layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from squarefuse.models.fusion.common import ArgumentError, ResidualTemporalMixer, check_int

__all__ = ["TemporalConv"]


class TemporalConv(ResidualTemporalMixer):
    """``h = x + MLP(depthwise_conv_time(LayerNorm(x)))`` along the valid frames.

    Each channel is convolved over the valid frames of its token with its own kernel of
    ``kernel_size`` taps, zero-padded at the clip's ends; the MLP's output is zero-initialised.

    Args:
        d_model: Token width ``D``.
        kernel_size: Odd number of taps over time.
        mlp_ratio: Hidden width of the MLP over ``D``.
    """

    def __init__(self, d_model: int, kernel_size: int = 3, mlp_ratio: float = 4.0) -> None:
        super().__init__(d_model, mlp_ratio)
        kernel_size = check_int(kernel_size, "fusion.kernel_size", minimum=1)
        if kernel_size % 2 == 0:
            # An even kernel cannot be centred on the frame it updates.
            raise ArgumentError("fusion.kernel_size", f"must be odd, got {kernel_size}")
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)

    def mix(self, z_BTND: Tensor) -> Tensor:
        B, T, N, D = z_BTND.shape
        z_SDT = z_BTND.permute(0, 2, 3, 1).reshape(B * N, D, T)
        return self.conv(z_SDT).reshape(B, N, D, T).permute(0, 3, 1, 2)
