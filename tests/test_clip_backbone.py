"""CLIP backbones (configs/backbone/vit_*_clip.yaml): random CLIP-architecture weights loaded from a
local file through backbone.pretrained_path, CLIP's normalisation, the pre-norm; nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from helpers.configs import backbone_config, compose_config, fusion_config
from omegaconf import OmegaConf
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import QuickGELU

from squarefuse.datasets.preprocess import VideoNormalizer
from squarefuse.models import build_classifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = dict(depth=2, embed_dim=64, num_heads=2)


@pytest.mark.parametrize("config, patch", [("vit_b16_clip", 16), ("vit_l14_clip", 14)])
def test_clip_backbone_loads_a_local_file_with_clip_normalisation(tmp_path, config, patch, no_network):
    torch.manual_seed(0)
    cfg = backbone_config(config)
    assert cfg.name.endswith(".openai") and cfg.name in timm.list_pretrained(cfg.name)
    img_size = 2 * patch
    # The CLIP image tower as timm stores it, with its 512-d projection as `head` (dropped on load).
    source = timm.create_model(cfg.name, pretrained=False, num_classes=512, img_size=img_size, **SMALL)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in source.state_dict().items()}  # no default-init values
    path = tmp_path / "clip.safetensors"
    safetensors.torch.save_file(state, str(path))

    cfg.img_size = img_size
    cfg.pretrained_path = str(path)
    cfg.model_kwargs = SMALL
    model = build_classifier(
        cfg,
        fusion_config("square"),
        OmegaConf.load(CONFIGS / "head" / "cls.yaml"),
        num_classes=5,
    ).eval()
    vit = model.backbone.model
    loaded = vit.state_dict()
    for key in ("norm_pre.weight", "norm_pre.bias", "blocks.1.mlp.fc2.weight", "pos_embed", "norm.weight"):
        torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)
    assert isinstance(vit.blocks[0].mlp.act, QuickGELU)  # the activation CLIP was trained with

    # CLIP's mean/std reach the normaliser the trainer and the evaluator build from the model.
    assert model.mean == pytest.approx(OPENAI_CLIP_MEAN) and model.std == pytest.approx(OPENAI_CLIP_STD)
    normalizer = VideoNormalizer(model.mean, model.std, torch.device("cpu"))
    frames = torch.randint(0, 256, (1, 2, 3, img_size, img_size), dtype=torch.uint8)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(normalizer(frames), (frames.float() / 255 - mean) / std)

    # The pre-norm is applied to the embedded tokens before the first block.
    calls = []
    vit.norm_pre.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with torch.no_grad():
        logits = model(normalizer(frames))
    assert logits.shape == (1, 5)
    assert calls == [(2, 1 + 4, 64)]  # 2 frames, class token + 2x2 patches


@pytest.mark.parametrize("dataset", ["k400", "ssv2"])
def test_clip_backbone_replaces_the_recipe_backbone(dataset):
    cfg = compose_config("train", [f"dataset={dataset}", "backbone=vit_b16_clip"])
    assert cfg.backbone.name == "vit_base_patch16_clip_quickgelu_224.openai"
