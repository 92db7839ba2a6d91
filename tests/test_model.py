"""Tests of the video model: backbone wrapper, heads, classifier, config building."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import safetensors.torch
import timm
import timm.optim
import torch
from helpers.clips import among_padding
from helpers.configs import backbone_config, compose_config, fusion_config
from omegaconf import OmegaConf, open_dict

from squarefuse.models import (
    ClsHead,
    MeanHead,
    NoFusion,
    VideoBackbone,
    VideoClassifier,
    build_classifier,
    square_fuse,
)
from squarefuse.training.config_checks import check_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NUM_CLASSES = 7
T = 4
IMG = 32
# A ViT-Tiny cut down to 2 blocks and width 64 keeps each forward in milliseconds on CPU.
TINY_KWARGS = dict(depth=2, embed_dim=64, num_heads=2, patch_size=16)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def tiny_backbone(img_size: int = IMG, **kwargs) -> VideoBackbone:
    model_kwargs = dict(TINY_KWARGS)
    model_kwargs.update(kwargs.pop("model_kwargs", {}))
    return VideoBackbone("vit_tiny_patch16_224", img_size=img_size, model_kwargs=model_kwargs, **kwargs)


def tiny_classifier(head: str = "cls", fusion: str = "square", K: int = 4, **backbone_kwargs):
    fusion_fn = functools.partial(square_fuse, K=K) if fusion == "square" else NoFusion
    head_fn = ClsHead if head == "cls" else MeanHead
    return VideoClassifier(
        backbone=tiny_backbone(**backbone_kwargs),
        fusion=fusion_fn,
        head=head_fn,
        num_classes=NUM_CLASSES,
    )


def clip(B: int = 2, frames: int = T, img_size: int = IMG) -> torch.Tensor:
    return torch.randn(B, frames, 3, img_size, img_size)


# --------------------------------------------------------------------------- backbone


@pytest.mark.parametrize(
    "name, model_kwargs, img_size, prefix, has_cls",
    [
        ("vit_tiny_patch16_224", dict(TINY_KWARGS), 32, 1, True),
        ("vit_tiny_patch16_224", dict(TINY_KWARGS, patch_size=8, reg_tokens=4), 32, 5, True),
        ("vit_tiny_patch16_224", dict(TINY_KWARGS, class_token=False, global_pool="avg"), 32, 0, False),
        ("eva02_tiny_patch14_224", dict(depth=2), 28, 1, True),
    ],
)
def test_backbone_token_layout(name, model_kwargs, img_size, prefix, has_cls):
    backbone = VideoBackbone(name, img_size=img_size, model_kwargs=model_kwargs)
    patch = model_kwargs.get("patch_size", 16 if "patch16" in name else 14)
    num_patches = (img_size // patch) ** 2
    tokens = backbone(clip(B=2, frames=3, img_size=img_size))
    assert tokens.shape == (2, 3, prefix + num_patches, backbone.embed_dim)
    assert backbone.num_prefix_tokens == prefix
    assert backbone.has_class_token is has_cls
    assert backbone.mean == tuple(float(v) for v in backbone.model.pretrained_cfg["mean"])
    assert len(backbone.std) == 3


def test_backbone_frames_are_independent():
    backbone = tiny_backbone().eval()
    video = clip()
    tokens = backbone(video)
    single = backbone.model.forward_features(video[1, 2:3])
    torch.testing.assert_close(tokens[1, 2], single[0])


def test_eva_uses_its_clip_normalisation():
    backbone = VideoBackbone("eva02_tiny_patch14_224", img_size=28, model_kwargs=dict(depth=2))
    assert backbone.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match="vit_tinyy_patch16_224.*timm.list_models"):
        VideoBackbone("vit_tinyy_patch16_224")
    with pytest.raises(ValueError, match="no pretrained tag 'bogus'"):
        VideoBackbone("vit_tiny_patch16_224.bogus")


def test_non_vit_model_raises():
    with pytest.raises(ValueError, match="resnet18.*ViT-family"):
        VideoBackbone("resnet18", img_size=32)


def test_misspelt_model_kwarg_raises():
    with pytest.raises(ValueError, match="deph"):
        VideoBackbone("vit_tiny_patch16_224", img_size=32, model_kwargs=dict(deph=2))


def test_missing_weights_file_raises(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        tiny_backbone(pretrained=True, pretrained_path=str(path))


def test_weights_path_without_pretrained_raises(tmp_path):
    with pytest.raises(ValueError, match="pretrained=true"):
        tiny_backbone(pretrained=False, pretrained_path=str(tmp_path / "w.pth"))


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_local_pretrained_file_resamples_pos_embed(tmp_path, suffix, no_network):
    kwargs = dict(TINY_KWARGS, patch_size=8)
    # A 1000-class head as in real ImageNet checkpoints: the loader must drop it.
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000, img_size=32, **kwargs)
    state = source.state_dict()
    path = tmp_path / f"weights.{suffix}"
    if suffix == "safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)

    backbone = VideoBackbone(
        "vit_tiny_patch16_224",
        img_size=48,
        pretrained=True,
        pretrained_path=str(path),
        model_kwargs=kwargs,
    )
    model = backbone.model
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 64)  # resampled from 1 + 4 * 4
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.cls_token, state["cls_token"], rtol=0, atol=0)
    # The class token's pos-embed is kept as is; only the patch grid is resampled.
    torch.testing.assert_close(model.pos_embed[:, 0], state["pos_embed"][:, 0], rtol=0, atol=0)
    assert backbone(clip(B=1, frames=2, img_size=48)).shape == (1, 2, 37, 64)


def test_hub_weights_without_network_point_to_pretrained_path(no_network):
    with pytest.raises(RuntimeError, match="vit_tiny_patch16_224.*backbone.pretrained_path"):
        tiny_backbone(pretrained=True)


def test_weights_file_missing_backbone_keys_raises(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, **TINY_KWARGS)
    state = source.state_dict()
    del state["blocks.1.mlp.fc1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"partial\.pth.*blocks\.1\.mlp\.fc1\.weight"):
        tiny_backbone(pretrained=True, pretrained_path=str(path))


# --------------------------------------------------------------------------- heads


def test_cls_head_uses_only_class_token_of_valid_frames():
    head = ClsHead(embed_dim=16, num_classes=3, num_prefix_tokens=1, has_class_token=True)
    h = torch.randn(2, 5, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    logits = head(h, mask)
    changed = h.clone()
    changed[:, :, 1:] = torch.randn_like(changed[:, :, 1:])  # patch tokens
    changed[~mask] = float("nan")  # padded frames
    torch.testing.assert_close(head(changed, mask), logits)
    expected = head.fc(head.norm(h[0, :3, 0].mean(0)))
    torch.testing.assert_close(logits[0], expected)


def test_mean_head_skips_prefix_tokens_and_padded_frames():
    head = MeanHead(embed_dim=16, num_classes=3, num_prefix_tokens=2, has_class_token=True)
    h = torch.randn(2, 5, 6, 16)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])  # 0/1 ints are accepted
    logits = head(h, mask)
    changed = h.clone()
    changed[:, :, :2] = 1e3  # prefix tokens
    changed[0, 2:] = float("inf")  # padded frames
    torch.testing.assert_close(head(changed, mask), logits)
    expected = head.fc(head.norm(h[0, :2, 2:].mean(dim=(0, 1))))
    torch.testing.assert_close(logits[0], expected)
    torch.testing.assert_close(head(h[1:]), logits[1:])  # no mask == all valid


def test_head_init_is_small_with_zero_bias():
    head = MeanHead(embed_dim=64, num_classes=10, num_prefix_tokens=1, has_class_token=True)
    assert torch.count_nonzero(head.fc.bias) == 0
    assert 0 < head.fc.weight.std() < 0.03
    assert head.fc.weight.abs().max() <= 0.04  # truncated at 2 std


def test_cls_head_without_class_token_raises():
    with pytest.raises(ValueError, match="vit_tiny_patch16_224.*head=mean"):
        tiny_classifier(head="cls", model_kwargs=dict(class_token=False, global_pool="avg"))


# --------------------------------------------------------------------------- classifier


@pytest.mark.parametrize(
    "head, fusion, K",
    [("cls", "square", 1), ("cls", "square", 4), ("mean", "square", 8), ("cls", "none", 0), ("mean", "none", 0)],
)
def test_classifier_logits_shape_and_gradients(head, fusion, K):
    model = tiny_classifier(head=head, fusion=fusion, K=K)
    logits = model(clip(B=3))
    assert logits.shape == (3, NUM_CLASSES)
    logits.square().sum().backward()
    assert model.backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0
    # Every trainable parameter must be used: DDP rejects unused ones.
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_avg_pool_backbone_has_no_unused_parameters():
    model = tiny_classifier(head="mean", model_kwargs=dict(class_token=False, global_pool="avg"))
    model(clip()).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


@pytest.mark.parametrize("head, fusion", [("cls", "square"), ("mean", "square"), ("mean", "none")])
@pytest.mark.parametrize("layout", ["end", "interleaved"])
def test_padding_never_changes_logits(head, fusion, layout):
    model = tiny_classifier(head=head, fusion=fusion, K=4).eval()
    real = clip(B=1, frames=3)
    positions = [0, 1, 2] if layout == "end" else [0, 2, 5]
    padded, mask = among_padding(real, torch.randn(1, 6, 3, IMG, IMG) * 5, positions)  # random padding content
    with torch.no_grad():
        expected = model(real)
        got = model(padded, mask)
        other = model(torch.where(mask[..., None, None, None], padded, -padded), mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other, got, rtol=1e-5, atol=1e-5)


def test_padding_batch_matches_per_clip_logits():
    model = tiny_classifier(head="cls", fusion="square", K=4).eval()
    video = clip(B=2, frames=5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        batch = model(video, mask)
        first = model(video[:1])
        second = model(video[1:, :2])
    torch.testing.assert_close(batch, torch.cat([first, second]), rtol=1e-5, atol=1e-5)


def test_invalid_masks_raise():
    model = tiny_classifier().eval()
    video = clip(B=2)
    with pytest.raises(ValueError, match="at least one valid frame"):
        model(video, torch.tensor([[True] * T, [False] * T]))
    with pytest.raises(ValueError, match="mask shape"):
        model(video, torch.ones(2, T + 1, dtype=torch.bool))


def test_frozen_backbone_gets_no_gradients():
    model = tiny_classifier(freeze=True, drop_path_rate=0.2)
    model.train()
    assert not model.backbone.model.training  # no drop path on frozen features
    assert all(not p.requires_grad for p in model.backbone.parameters())
    tokens = model.backbone(clip())
    assert not tokens.requires_grad  # no graph built through the backbone
    model(clip()).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.fc.weight.grad is not None and model.fusion.beta.grad is not None


def test_grad_checkpointing_gives_same_output_and_gradients():
    torch.manual_seed(1)
    plain = tiny_classifier(head="mean")
    torch.manual_seed(1)
    ckpt = tiny_classifier(head="mean", grad_checkpointing=True)
    assert ckpt.backbone.model.grad_checkpointing
    video = clip()
    out_plain, out_ckpt = plain(video), ckpt(video)
    torch.testing.assert_close(out_ckpt, out_plain)
    out_plain.sum().backward()
    out_ckpt.sum().backward()
    torch.testing.assert_close(
        ckpt.backbone.model.blocks[0].attn.qkv.weight.grad,
        plain.backbone.model.blocks[0].attn.qkv.weight.grad,
    )


def test_mean_std_come_from_backbone():
    model = tiny_classifier()
    assert model.mean == model.backbone.mean == (0.5, 0.5, 0.5)
    assert model.std == model.backbone.std


def test_layer_decay_param_groups_through_wrapper():
    model = tiny_classifier(head="cls", fusion="square", K=4)
    groups = timm.optim.param_groups_layer_decay(
        model, weight_decay=0.05, layer_decay=0.75, no_weight_decay_list=model.no_weight_decay()
    )
    by_param = {}
    for group in groups:
        for param in group["params"]:
            assert id(param) not in by_param, "a parameter is in two groups"
            by_param[id(param)] = group
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)  # every parameter has a group
    scale = {n: by_param[id(p)]["lr_scale"] for n, p in named.items()}
    decay = {n: by_param[id(p)]["weight_decay"] for n, p in named.items()}

    stem = scale["backbone.model.patch_embed.proj.weight"]
    assert scale["backbone.model.pos_embed"] == scale["backbone.model.cls_token"] == stem
    first = scale["backbone.model.blocks.0.attn.qkv.weight"]
    last = scale["backbone.model.blocks.1.attn.qkv.weight"]
    assert stem < first < last < scale["head.fc.weight"] == 1.0
    assert scale["fusion.proj.weight"] == scale["fusion.beta"] == 1.0
    assert last == pytest.approx(0.75) and first == pytest.approx(0.75**2)

    for name in [
        "backbone.model.pos_embed",
        "backbone.model.cls_token",
        "backbone.model.blocks.0.attn.qkv.bias",
        "backbone.model.blocks.0.norm1.weight",
        "backbone.model.norm.weight",
        "fusion.beta",
        "head.norm.weight",
        "head.fc.bias",
    ]:
        assert decay[name] == 0.0, name
    for name in ["backbone.model.blocks.0.attn.qkv.weight", "head.fc.weight", "fusion.mlp.1.weight"]:
        assert decay[name] == 0.05, name


class ScaledMeanHead(torch.nn.Module):
    """A head with an argument of its own (`scale`) that takes only two of the classifier's inputs."""

    reads_patch_tokens = True

    def __init__(self, embed_dim: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.fc = torch.nn.Linear(embed_dim, num_classes)

    def forward(self, h_BTND: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.scale * h_BTND.mean(dim=(1, 2)))


def test_a_head_with_arguments_of_its_own_needs_only_its_config(tmp_path):
    # Named by `_target_` in a command-line override: no change to the classifier, and the head is
    # given only the inputs its signature names (no num_prefix_tokens nor has_class_token here).
    target = f"{__name__}.ScaledMeanHead"
    overrides = ["backbone=tiny", "head=mean", f"head._target_={target}", "~head.dropout", "+head.scale=3.0"]
    cfg = compose_config("train", [f"dataset.root={tmp_path}", *overrides, f"backbone.img_size={IMG}"])
    with open_dict(cfg):
        cfg.backbone.model_kwargs = dict(TINY_KWARGS)
    check_train_config(cfg)
    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=NUM_CLASSES)
    assert isinstance(model.head, ScaledMeanHead) and model.head.scale == 3.0
    assert model.head.fc.weight.shape == (NUM_CLASSES, TINY_KWARGS["embed_dim"])
    assert model(clip()).shape == (2, NUM_CLASSES)
    # Its config alone (`_target_` and its arguments, no `_partial_`) builds it too.
    plain = build_classifier(cfg.backbone, cfg.fusion, {"_target_": target, "scale": 2.0}, num_classes=3)
    assert plain.head.scale == 2.0 and plain(clip()).shape == (2, 3)


def test_build_classifier_from_yaml_configs():
    backbone_cfg = backbone_config("tiny")
    backbone_cfg.img_size = IMG
    backbone_cfg.model_kwargs = dict(TINY_KWARGS)
    fusion_cfg = fusion_config("square", "K=2")
    head_cfg = OmegaConf.load(CONFIGS / "head" / "mean.yaml")
    head_cfg.dropout = 0.1

    model = build_classifier(backbone_cfg, fusion_cfg, head_cfg, num_classes=NUM_CLASSES)
    assert isinstance(model.backbone, VideoBackbone)
    assert model.fusion.proj.weight.shape == (2, 64)
    assert isinstance(model.head, MeanHead) and model.head.drop.p == 0.1
    assert model(clip()).shape == (2, NUM_CLASSES)

    plain = build_classifier(
        OmegaConf.to_container(backbone_cfg),
        fusion_config("none"),
        OmegaConf.load(CONFIGS / "head" / "cls.yaml"),
        num_classes=3,
    )
    assert isinstance(plain.fusion, NoFusion) and isinstance(plain.head, ClsHead)
    assert plain(clip()).shape == (2, 3)


def test_tiny_backbone_config_as_shipped_builds_and_runs():
    cfg = backbone_config("tiny")
    model = build_classifier(
        cfg,
        fusion_config("square"),
        OmegaConf.load(CONFIGS / "head" / "cls.yaml"),
        num_classes=NUM_CLASSES,
    )
    assert model(clip(B=1, frames=2, img_size=cfg.img_size)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("name", ["tiny", "vit_s16", "vit_b16", "vit_l16"])
def test_backbone_configs_name_real_models(name):
    cfg = backbone_config(name)
    assert cfg._target_ == "squarefuse.models.VideoBackbone"
    assert timm.is_model(cfg.name)
    if "." in cfg.name:
        assert cfg.name in timm.list_pretrained(cfg.name)
