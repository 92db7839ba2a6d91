"""Input clips for the padding tests: a real clip placed among padding frames, with its mask."""

from __future__ import annotations

import torch


def among_padding(real: torch.Tensor, padding: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The frames of `real` [1,T,...] at `positions` of a copy of `padding` [1,S,...]; and the mask [1,S].

    The mask marks the real frames: a model that honours it must see only `real`.
    """
    padded = padding.clone()
    padded[0, positions] = real[0]
    mask = torch.zeros(padding.shape[:2], dtype=torch.bool)
    mask[0, positions] = True
    return padded, mask
