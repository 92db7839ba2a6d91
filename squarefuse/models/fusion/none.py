"""The ``fusion=none`` baseline: no temporal mixing (TSN's consensus is the head's mean over time)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["NoFusion"]


class NoFusion(nn.Module):
    """Tokens pass through unchanged.

    Args:
        d_model: Token width (unused; kept so every fusion is built the same way).
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model

    def forward(self, x: Tensor, valid_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns ``(x, {})``."""
        return x, {}
