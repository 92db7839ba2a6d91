"""Parameters and FLOPs per clip (squarefuse.models.complexity) and scripts/model_info.py."""

from __future__ import annotations

import functools
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from squarefuse.models import ClsHead, MeanHead, NoFusion, VideoBackbone, VideoClassifier, square_fuse
from squarefuse.models.complexity import format_model_info, model_complexity

REPO = Path(__file__).resolve().parents[1]
D, IMG, T = 64, 32, 4
TOKENS = 1 + (IMG // 16) ** 2


def classifier(fusion: str = "square", head=ClsHead) -> VideoClassifier:
    torch.manual_seed(0)
    backbone = VideoBackbone("vit_tiny_patch16_224", img_size=IMG, model_kwargs=dict(depth=2, embed_dim=D, num_heads=2))
    fusion_fn = functools.partial(square_fuse, K=4) if fusion == "square" else NoFusion
    return VideoClassifier(backbone=backbone, fusion=fusion_fn, head=head, num_classes=7)


def frame_flops(model: VideoClassifier) -> int:
    """FLOPs of the timm ViT alone on one frame."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.backbone.model.forward_features(torch.zeros(1, 3, IMG, IMG))
    return counter.get_total_flops()


@pytest.mark.parametrize("fusion, head", [("square", ClsHead), ("none", MeanHead)])
def test_params_are_exact_and_flops_add_up(fusion, head):
    model = classifier(fusion, head)
    model.train()
    info = model_complexity(model, num_frames=T, img_size=IMG)
    params, flops = info["params"], info["flops_per_clip"]
    assert list(params) == ["backbone", "fusion", "block_fusions", "head", "total"] == list(flops)
    for part in ("backbone", "fusion", "head"):
        assert params[part] == sum(p.numel() for p in getattr(model, part).parameters())
    assert params["block_fusions"] == flops["block_fusions"] == 0
    assert (
        params["total"] == sum(p.numel() for p in model.parameters()) == sum(params[p] for p in params if p != "total")
    )
    assert flops["total"] == sum(flops[p] for p in flops if p != "total")

    # The backbone runs the image model once per frame: T x its per-frame count in timm alone.
    assert flops["backbone"] == T * frame_flops(model)
    assert flops["head"] == 2 * D * 7  # one Linear(D, 7) per clip (norms are not counted)
    if fusion == "square":
        assert 0 < flops["fusion"] < flops["backbone"] / 10
    else:
        assert params["fusion"] == flops["fusion"] == 0
    assert info["num_frames"] == T and info["img_size"] == IMG
    assert model.training  # modes restored
    eight = model_complexity(model, num_frames=2 * T, img_size=IMG)["flops_per_clip"]
    assert eight["backbone"] == 2 * flops["backbone"]

    table = format_model_info(info)
    assert "backbone" in table and "total" in table and "GFLOPs" in table


def test_nested_block_fusions_are_counted_once_in_their_own_part():
    """Fusions inserted after blocks (`fusion.after_blocks`) run inside the backbone's block loop:
    their FLOPs go to `block_fusions` only, and the backbone keeps exactly the ViT's own."""
    plain = classifier()
    vit_frame_flops = frame_flops(plain)
    torch.manual_seed(0)
    model = VideoClassifier(
        backbone=plain.backbone,
        fusion=functools.partial(square_fuse, K=4),
        head=ClsHead,
        num_classes=7,
        fusion_after_blocks=(0, 1),
    )
    info = model_complexity(model, num_frames=T, img_size=IMG)
    params, flops = info["params"], info["flops_per_clip"]
    assert params["block_fusions"] == sum(p.numel() for p in model.block_fusions.parameters()) > 0
    # Each inserted layer costs what the same layer costs after the last block, on the same tokens.
    assert flops["block_fusions"] == 2 * flops["fusion"] > 0
    assert flops["backbone"] == T * vit_frame_flops
    assert flops["total"] == sum(flops[p] for p in flops if p != "total")


def test_model_info_script(tmp_path, monkeypatch, capsys):
    out = tmp_path / "info.json"
    overrides = ["backbone.img_size=32", "backbone.model_kwargs.depth=2", "dataset.num_frames=4", "fusion.K=4"]
    script = REPO / "scripts" / "model_info.py"
    monkeypatch.setattr(sys, "argv", [str(script), *overrides, "num_classes=5", "--json", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    info = json.loads(out.read_text())
    assert info["num_frames"] == 4 and info["img_size"] == 32
    assert info["params"]["head"] == 96 * 5 + 5 + 2 * 96  # tiny ViT width 96: norm + Linear(96, 5)
    assert info["flops_per_clip"]["fusion"] > 0
    printed = capsys.readouterr().out
    assert "backbone" in printed and "total" in printed and "5 classes" in printed
