"""Frame-order perturbations for evaluation: the frames of every clip reversed or shuffled.

`eval.py frame_order=reversed` measures how much a model relies on temporal order: a model that
pools frames without order (`fusion=none`) gives the same predictions, one that learned the
direction of motion does not. Only the valid frames move: a clip's padded positions (mask False,
at the end of short clips) keep their padding and the mask is unchanged.

A shuffled clip's permutation is drawn from a generator seeded with (`seed`, video index), so it
does not depend on the batch size, the number of workers or the number of ranks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FRAME_ORDERS = ("normal", "reversed", "shuffled")


def check_frame_order(order: str, seed: int = 0) -> None:
    """Raise ValueError naming the key when `frame_order` or `frame_order_seed` is invalid."""
    if order not in FRAME_ORDERS:
        raise ValueError(f"frame_order must be one of {', '.join(FRAME_ORDERS)}, got {order!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"frame_order_seed must be an int >= 0, got {seed!r}")


def frame_permutation(valid_T: Tensor, order: str, generator: torch.Generator | None = None) -> Tensor:
    """Index [T] that reorders one clip (`clip[perm]`): valid frames reversed or permuted among
    the valid positions, padded positions mapped to themselves."""
    perm = torch.arange(valid_T.shape[0])
    valid_pos = valid_T.bool().nonzero().squeeze(1).cpu()
    if order == "reversed":
        perm[valid_pos] = valid_pos.flip(0)
    elif order == "shuffled":
        perm[valid_pos] = valid_pos[torch.randperm(valid_pos.numel(), generator=generator)]
    elif order != "normal":
        raise ValueError(f"frame_order must be one of {', '.join(FRAME_ORDERS)}, got {order!r}")
    return perm


def _video_generator(seed: int, video_id: int) -> torch.Generator:
    # torch's CPU generator keeps only 32 bits of its seed: mix (seed, video) into 32 bits rather
    # than packing them side by side, which would drop the seed.
    mixed = int(np.random.SeedSequence([seed, video_id]).generate_state(1)[0])
    return torch.Generator().manual_seed(mixed)


def reorder_frames(video: Tensor, mask: Tensor, order: str, *, video_ids: Tensor, seed: int = 0) -> Tensor:
    """The views of each video with their frames in `order`.

    Args:
        video: [B, V, T, ...] the V views (clips x crops) of B videos.
        mask: [B, V, T] valid frames (bool or 0/1).
        order: normal | reversed | shuffled.
        video_ids: [B] dataset index of each video (seeds its shuffle).
        seed: the shuffle seed (`frame_order_seed`).

    Returns:
        A reordered copy of `video` (`video` itself for `normal`); the mask is unchanged.
    """
    check_frame_order(order, seed)
    if order == "normal":
        return video
    B, V, T = mask.shape
    if video.shape[:3] != mask.shape or video_ids.shape != (B,):
        raise ValueError(
            f"video {tuple(video.shape)}, mask {tuple(mask.shape)} and video_ids {tuple(video_ids.shape)} "
            "must be [B,V,T,...], [B,V,T] and [B]"
        )
    perms = torch.empty(B, V, T, dtype=torch.long)
    for b in range(B):
        generator = _video_generator(seed, int(video_ids[b])) if order == "shuffled" else None
        for v in range(V):
            perms[b, v] = frame_permutation(mask[b, v], order, generator)
    perms = perms.to(video.device)
    return video[
        torch.arange(B, device=video.device)[:, None, None], torch.arange(V, device=video.device)[:, None], perms
    ]
