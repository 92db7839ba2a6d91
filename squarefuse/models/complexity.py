"""Parameters and FLOPs of a video classifier per clip, broken down by its parts.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one dummy clip
``[1,T,3,H,W]``: 2 FLOPs per multiply-add of every matmul, convolution and attention. Papers and
timm's tables that quote "FLOPs" for ViTs usually count multiply-adds (ViT-B/16 at 224 px: 16.9
GMACs per frame in timm's tables, 33.7 GFLOPs here): divide by 2 to compare.

The parts are the classifier's top-level children (``backbone``, ``fusion``, ``block_fusions``,
``head``). A part may run inside another one's forward (fusions inserted after backbone blocks are
called from the backbone's loop): every FLOP goes to the innermost part running when it happens,
so the parts add up to the total.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PARTS", "format_model_info", "model_complexity", "write_model_info"]

# Always reported (0 when the classifier has no such part), in this order.
PARTS = ("backbone", "fusion", "block_fusions", "head")


def _parts(model: nn.Module) -> dict[str, nn.Module | None]:
    parts: dict[str, nn.Module | None] = dict.fromkeys(PARTS)
    parts.update(dict(model.named_children()))
    return parts


def _count_params(parts: Mapping[str, nn.Module | None], model: nn.Module) -> dict[str, int]:
    params = {
        name: sum(p.numel() for p in part.parameters()) if part is not None else 0 for name, part in parts.items()
    }
    params["total"] = sum(p.numel() for p in model.parameters())
    return params


@torch.no_grad()
def _count_flops(parts: Mapping[str, nn.Module | None], model: nn.Module, clip: torch.Tensor) -> dict[str, int]:
    flops = dict.fromkeys(parts, 0)
    counter = FlopCounterMode(display=False)
    stack: list[str] = []  # the parts running now, innermost last
    last_total = [0]

    def settle() -> None:
        # The FLOPs since the last part boundary belong to the innermost running part.
        total = counter.get_total_flops()
        if stack:
            flops[stack[-1]] += total - last_total[0]
        last_total[0] = total

    def enter(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            settle()
            stack.append(name)

        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        settle()
        stack.pop()

    # Every submodule, not only the part itself: a container (ModuleDict) is never called.
    handles = []
    for name, part in parts.items():
        for module in part.modules() if part is not None else ():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    modes = [(m, m.training) for m in model.modules()]
    # No tensor may require grad while counting: FlopCounterMode's module tracker hooks the autograd
    # graph of inputs that do, and a parameter handed to a submodule as an input (a position
    # embedding) has no graph under no_grad, which its hook refuses.
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    try:
        for p in trainable:
            p.requires_grad_(False)
        with counter:
            model(clip)
        settle()
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for handle in handles:
            handle.remove()
        for m, mode in modes:
            m.training = mode
    assert not stack, f"unbalanced forward hooks: {stack}"
    flops["total"] = counter.get_total_flops()
    return flops


def model_complexity(model: nn.Module, num_frames: int, img_size: int) -> dict[str, Any]:
    """Parameters and FLOPs per clip of `model`, by part.

    Args:
        model: a `VideoClassifier` (any module taking ``[B,T,3,H,W]`` works; its top-level children
            are the parts).
        num_frames: frames per clip ``T``.
        img_size: frame height and width ``H = W``.

    Returns:
        ``{"params": {part: n, ..., "total": n}, "flops_per_clip": {part: n, ..., "total": n},
        "num_frames": T, "img_size": H}`` with the parts ``backbone``, ``fusion``,
        ``block_fusions``, ``head`` (0 when absent) and any other top-level child. The model runs
        once in eval mode without autograd; its modes are restored and no RNG is used. A model on
        cached tokens gets a token clip ``[1,T,N,D]``: its counts are the fusion's and head's only.
    """
    if num_frames < 1 or img_size < 1:
        raise ValueError(f"num_frames and img_size must be >= 1, got {num_frames} and {img_size}")
    parts = _parts(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    token_shape = getattr(getattr(model, "backbone", None), "token_shape", None)
    if token_shape is not None:
        # A model trained on cached tokens (`CachedTokens`): fusion and head only; the backbone
        # that made the cache ran once, when caching, and is not counted here.
        clip = torch.zeros(1, num_frames, *token_shape, device=device, dtype=dtype)
    else:
        clip = torch.zeros(1, num_frames, 3, img_size, img_size, device=device, dtype=dtype)
    return {
        "params": _count_params(parts, model),
        "flops_per_clip": _count_flops(parts, model, clip),
        "num_frames": int(num_frames),
        "img_size": int(img_size),
    }


def format_model_info(info: Mapping[str, Any]) -> str:
    """A table of `model_complexity`'s result: parameters (M) and GFLOPs per clip by part."""
    params, flops = info["params"], info["flops_per_clip"]
    total_flops = max(flops["total"], 1)
    lines = [
        f"model size at {info['num_frames']} frames x {info['img_size']} px "
        "(GFLOPs = 2 x multiply-adds, per clip; halve to compare with papers quoting GMACs)",
        f"{'part':<14}{'params (M)':>12}{'GFLOPs':>12}{'share':>8}",
    ]
    for name in params:
        lines.append(
            f"{name:<14}{params[name] / 1e6:>12.4g}{flops[name] / 1e9:>12.4g}{100 * flops[name] / total_flops:>7.2f}%"
        )
    return "\n".join(lines)


def write_model_info(info: Mapping[str, Any], path: str | Path) -> Path:
    """Writes `model_complexity`'s result as JSON (the run's ``model_info.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path
