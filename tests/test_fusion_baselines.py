"""The baseline fusion layers, the SQuaRe-Fuse ablations and where the fusion sits.

Every option of the ``fusion`` config group must obey the masking rule of the layer interface
(a padded clip gives, on its real frames, the unpadded clip's output; padding comes back
unchanged), wherever it is placed in the classifier.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import pytest
import timm.optim
import torch
from helpers.clips import among_padding
from helpers.configs import CONFIG_DIR, compose_config, fusion_config, tiny_overrides
from hydra.utils import instantiate
from omegaconf import OmegaConf

from squarefuse.models import ClsHead, MeanHead, VideoBackbone, VideoClassifier, build_classifier
from squarefuse.models.classifier import split_fusion_config
from squarefuse.models.fusion import NoFusion, SQuaReFuse, TemporalAttention, TemporalConv, TemporalShift, square_fuse
from squarefuse.models.heads import AttentiveHead
from squarefuse.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
D = 32
NUM_CLASSES = 5
IMG = 32
TINY_KWARGS = dict(depth=2, embed_dim=64, num_heads=2, patch_size=16)
# Not joint_mlp: the benchmark's token control mixes every position and reads padding as zeros at its frame
# index, on purpose (tests/test_controls.py).
FUSION_OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "fusion").glob("*.yaml") if p.stem != "joint_mlp")
# Every option as shipped, plus the variants of temporal_attn's own keys.
VARIANTS = [(option, ()) for option in FUSION_OPTIONS] + [
    ("temporal_attn", ("tokens=cls",)),
    ("temporal_attn", ("depth=2", "heads=4")),
    ("temporal_attn", ("pos_init=zeros",)),
]
VARIANT_IDS = [" ".join((option, *overrides)) for option, overrides in VARIANTS]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def layer_factory(option: str, *overrides: str):
    """The Hydra partial of a fusion option, as build_classifier instantiates it."""
    layer_cfg, _ = split_fusion_config(fusion_config(option, *overrides))
    return instantiate(layer_cfg, _convert_="all")


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere: the zero-initialised output layers would hide mixing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def build_layer(option: str, *overrides: str, d_model: int = D) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise(layer_factory(option, *overrides)(d_model=d_model)).eval()


def tokens(B: int, T: int, N: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, N, D, generator=torch.Generator().manual_seed(seed))


def test_every_option_is_covered():
    assert set(FUSION_OPTIONS) >= {
        "none",
        "square",
        "temporal_attn",
        "temporal_shift",
        "temporal_conv",
        "square_quantiles_only",
        "square_trend_only",
        "square_light",
        "square_fixed_sigma",
    }


# ---------------------------------------------------------------------------------- the layers


@pytest.mark.parametrize(("option", "overrides"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("layout", ["end", "interleaved"])
def test_padding_is_as_if_absent_with_clip_mask(option, overrides, layout):
    layer = build_layer(option, *overrides)
    T, N, lengths = 9, 3, [5, 9, 1]
    g = torch.Generator().manual_seed(0)
    valid_BT = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, L in enumerate(lengths):
        slots = torch.arange(L) if layout == "end" else torch.randperm(T, generator=g)[:L].sort().values
        valid_BT[b, slots] = True
    real = [tokens(1, L, N, seed=10 + b)[0] for b, L in enumerate(lengths)]
    x = 50.0 * tokens(len(lengths), T, N, seed=3)  # garbage padding
    for b, r in enumerate(real):
        x[b, valid_BT[b]] = r

    with torch.no_grad():
        h, aux = layer(x, valid_mask=valid_BT)
        assert h.shape == x.shape and h.dtype == x.dtype and isinstance(aux, dict)
        for b, r in enumerate(real):
            h_ref, _ = layer(r[None])
            # Outputs reach |h| ~ 5 after two randomised blocks: a few float32 ulps is 1e-5 there.
            torch.testing.assert_close(h[b, valid_BT[b]], h_ref[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(h[~valid_BT], x[~valid_BT])
        if option != "none":
            # The padding would change the real frames' outputs if it were not masked out.
            h_unmasked, _ = layer(x)
            assert not torch.allclose(h_unmasked[0, valid_BT[0]], h[0, valid_BT[0]], atol=1e-3)


@pytest.mark.parametrize(("option", "overrides"), VARIANTS, ids=VARIANT_IDS)
def test_padding_is_as_if_absent_with_per_token_mask(option, overrides):
    layer = build_layer(option, *overrides)
    B, T, N = 2, 8, 4
    valid_BTN = torch.rand(B, T, N, generator=torch.Generator().manual_seed(1)) < 0.6
    valid_BTN[0, :, 0] = True  # a full-length sequence
    valid_BTN[1, :, 1] = False  # a token without any valid frame ...
    valid_BTN[1, :, 2] = False
    valid_BTN[1, 4, 2] = True  # ... and one with a single valid frame
    x = 50.0 * tokens(B, T, N, seed=2)
    real = {}
    for b in range(B):
        for n in range(N):
            L = int(valid_BTN[b, :, n].sum())
            real[b, n] = torch.randn(L, D, generator=torch.Generator().manual_seed(100 + 10 * b + n))
            x[b, valid_BTN[b, :, n], n] = real[b, n]

    with torch.no_grad():
        h, _ = layer(x, valid_mask=valid_BTN)
        assert torch.isfinite(h).all()
        assert torch.equal(h[~valid_BTN], x[~valid_BTN])
        for (b, n), r in real.items():
            if len(r) == 0:
                continue
            # Each token's sequence alone, its other tokens' frames all valid (their values do
            # not matter to it unless the layer mixes tokens, which none may).
            x_ref = tokens(1, len(r), N, seed=5)
            x_ref[0, :, n] = r
            h_ref, _ = layer(x_ref)
            if getattr(layer, "tokens", "all") == "cls" and n != 0:
                torch.testing.assert_close(h[b, valid_BTN[b, :, n], n], r, atol=0, rtol=0)
            else:
                torch.testing.assert_close(h[b, valid_BTN[b, :, n], n], h_ref[0, :, n], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("option", "overrides"), VARIANTS, ids=VARIANT_IDS)
def test_gradients_are_finite_with_masks(option, overrides):
    layer = build_layer(option, *overrides).train()
    x = tokens(2, 6, 3).requires_grad_(True)
    valid = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)[:, :, None].expand(2, 6, 3)
    h, _ = layer(x, valid_mask=valid)
    h.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())
    if option != "none":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("cls", [TemporalAttention, TemporalShift, TemporalConv])
def test_baselines_start_as_identity(cls):
    """Zero-initialised output layers: a pretrained image model is not disturbed at step 0."""
    torch.manual_seed(0)
    layer = cls(d_model=D)
    x = tokens(2, 5, 3)
    h, _ = layer(x, valid_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert torch.equal(h, x)


def test_temporal_shift_moves_channels_along_valid_frames():
    layer = TemporalShift(d_model=16, shift_div=4)  # fold = 4 channels each way
    T = 5
    z = torch.arange(1.0, T + 1)[None, :, None, None].expand(1, T, 1, 16)  # frame t holds t+1
    mixed = layer.mix(z)[0, :, 0]
    assert mixed[:, :4].tolist() == [[2.0] * 4, [3.0] * 4, [4.0] * 4, [5.0] * 4, [0.0] * 4]  # one frame back
    assert mixed[:, 4:8].tolist() == [[0.0] * 4, [1.0] * 4, [2.0] * 4, [3.0] * 4, [4.0] * 4]  # one forward
    assert torch.equal(mixed[:, 8:], z[0, :, 0, 8:])


def test_temporal_conv_is_depthwise_over_time():
    layer = TemporalConv(d_model=4, kernel_size=3)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.tensor([1.0, 10.0, 100.0]).expand(4, 1, 3))
        layer.conv.bias.zero_()
    z = torch.zeros(1, 4, 1, 4)
    z[0, 1, 0, 2] = 1.0  # one impulse: frame 1, channel 2
    mixed = layer.mix(z)[0, :, 0]
    assert mixed[:, 2].tolist() == [100.0, 10.0, 1.0, 0.0]  # cross-correlation over time
    assert torch.equal(mixed[:, [0, 1, 3]], torch.zeros(4, 3))  # no mixing across channels


def test_temporal_attention_cls_leaves_other_tokens():
    layer = build_layer("temporal_attn", "tokens=cls")
    x = tokens(2, 4, 3)
    h, _ = layer(x)
    assert torch.equal(h[:, :, 1:], x[:, :, 1:])
    assert not torch.allclose(h[:, :, 0], x[:, :, 0])


def test_temporal_attention_needs_position_embedding_long_enough():
    layer = layer_factory("temporal_attn", "max_frames=4")(d_model=D)
    with pytest.raises(ValueError, match="fusion.max_frames"):
        layer(tokens(1, 5, 2))


def step0_gradients(layer: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of a cross-entropy through `layer` and a mean over frames and tokens (head=mean)."""
    layer.zero_grad()
    torch.manual_seed(1)
    head = MeanHead(embed_dim=D, num_classes=3, num_prefix_tokens=0, has_class_token=False)
    h, _ = layer(x)
    torch.nn.functional.cross_entropy(head(h), torch.tensor([0, 2])).backward()
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in layer.named_parameters()}


def test_temporal_attention_position_signal_is_order_dependent_from_step_0():
    """With the output projection at zero, the position embedding gets no gradient at step 0 under
    either init; the projection does, computed from the attention's output. With a zero embedding
    that output is order-blind, so a clip and its time reversal give the same step-0 gradients
    (order can enter only from a saddle); a random embedding makes them differ from step 0."""
    x = tokens(2, 5, 3)
    gaps = {}
    for init in ("zeros", "trunc_normal"):
        torch.manual_seed(0)
        layer = TemporalAttention(d_model=D, pos_init=init)
        assert torch.equal(layer(x)[0], x)  # the identity at step 0 either way
        forward, backward = step0_gradients(layer, x), step0_gradients(layer, x.flip(1))
        assert torch.equal(forward["pos_embed"], torch.zeros_like(layer.pos_embed))
        proj = forward["blocks.0.proj.weight"]
        assert proj.abs().max() > 1e-3  # what learns at step 0
        gaps[init] = max(((forward[n] - backward[n]).abs().max() / proj.abs().max()).item() for n in forward)
    assert gaps["zeros"] < 1e-5 and gaps["trunc_normal"] > 1e-3, gaps
    zeros, random = TemporalAttention(D, pos_init="zeros"), TemporalAttention(D)
    assert torch.count_nonzero(zeros.pos_embed) == 0 and 0.01 < random.pos_embed.std() < 0.03
    assert random.pos_embed.abs().max() <= 0.04  # truncated at 2 std
    random.load_state_dict(zeros.state_dict())  # the same keys: checkpoints of either load into the other


@pytest.mark.parametrize(
    ("option", "override", "key"),
    [
        ("square", "quantiles=[]", "fusion.quantiles"),
        ("square_quantiles_only", "quantiles=null", "fusion.quantiles"),
        ("square", "P=-1", "fusion.P"),
        ("square", "P=linear", "fusion.P"),
        ("square_fixed_sigma", "sigma=0", "fusion.sigma"),
        ("temporal_attn", "tokens=patch", "fusion.tokens"),
        ("temporal_attn", "heads=5", "fusion.heads"),
        ("temporal_attn", "depth=0", "fusion.depth"),
        ("temporal_attn", "mlp_ratio=0", "fusion.mlp_ratio"),
        ("temporal_attn", "pos_init=normal", "fusion.pos_init"),
        ("temporal_shift", "shift_div=1", "fusion.shift_div"),
        ("temporal_conv", "kernel_size=2", "fusion.kernel_size"),
    ],
)
def test_bad_values_name_the_key(option, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        layer_factory(option, override)(d_model=D)


def test_ablation_configs_build_what_they_say():
    quantiles_only = layer_factory("square_quantiles_only")(d_model=D)
    trend_only = layer_factory("square_trend_only")(d_model=D)
    light = layer_factory("square_light")(d_model=D)
    fixed = layer_factory("square_fixed_sigma")(d_model=D)
    assert isinstance(quantiles_only, SQuaReFuse) and quantiles_only.poly_order is None
    assert trend_only.quantiles == () and trend_only.poly_order == 2
    assert (light.num_dirs, light.quantiles, light.poly_order) == (8, (0.1, 0.5, 0.9), 1)
    assert fixed.sigma == 0.5
    x = tokens(2, 6, 3)
    _, aux = quantiles_only(x)
    assert aux["quantiles"].shape == (2, 3, 8, 3) and aux["trend"].shape == (2, 3, 8, 0)
    _, aux = trend_only(x)
    assert aux["quantiles"].shape == (2, 3, 8, 0) and aux["trend"].shape == (2, 3, 8, 3)
    # The quantiles-only layer is blind to the order of frames; the trend-only one is not.
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        for layer, blind in [(quantiles_only, True), (trend_only, False)]:
            update = layer(x)[0] - x
            update_permuted = layer(x[:, perm])[0] - x[:, perm]
            assert torch.allclose(update_permuted, update, atol=1e-5) == blind


def test_square_keeps_the_seed_keywords_and_the_config_symbols():
    torch.manual_seed(0)
    a = SQuaReFuse(d_model=D, num_dirs=4, quantiles=None, poly_order=1)
    torch.manual_seed(0)
    b = square_fuse(d_model=D, K=4, quantiles=None, P=1)
    assert a.state_dict().keys() == b.state_dict().keys() == SQuaReFuse(D, 4).state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.mlp[1].in_features == 4 * 2  # K x (P + 1) trend features, no quantiles
    with pytest.raises(ValueError, match="num_dirs"):
        SQuaReFuse(d_model=D, num_dirs=0)


# ------------------------------------------------------------------------------ the classifier


def tiny_backbone(**kwargs) -> VideoBackbone:
    return VideoBackbone("vit_tiny_patch16_224", img_size=IMG, model_kwargs=dict(TINY_KWARGS), **kwargs)


def classifier(
    option: str = "square",
    *overrides: str,
    after_backbone: bool = True,
    after_blocks=(),
    head=ClsHead,
    randomised: bool = True,
    **backbone_kwargs,
) -> VideoClassifier:
    torch.manual_seed(0)
    model = VideoClassifier(
        backbone=tiny_backbone(**backbone_kwargs),
        fusion=layer_factory(option, *overrides),
        head=head,
        num_classes=NUM_CLASSES,
        fusion_after_backbone=after_backbone,
        fusion_after_blocks=after_blocks,
    )
    if randomised:
        randomise(model.fusion, seed=1)
        randomise(model.block_fusions, seed=2)
    return model


def clip(B: int = 2, frames: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, frames, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


PLACEMENTS = [
    dict(after_backbone=True, after_blocks=()),
    dict(after_backbone=True, after_blocks=(0, 1)),
    dict(after_backbone=False, after_blocks=(0,)),
]
PLACEMENT_IDS = ["after_backbone", "after_blocks_0_1_and_backbone", "after_block_0_only"]


@pytest.mark.parametrize("placement", PLACEMENTS, ids=PLACEMENT_IDS)
@pytest.mark.parametrize(("option", "overrides"), VARIANTS, ids=VARIANT_IDS)
def test_classifier_padding_never_changes_logits(option, overrides, placement):
    model = classifier(option, *overrides, **placement).eval()
    real = clip(B=1, frames=3)
    padded, mask = among_padding(real, 5 * clip(B=1, frames=6, seed=1), [0, 2, 5])  # interleaved padding
    with torch.no_grad():
        expected = model(real)
        got = model(padded, mask)
        _, aux = model.forward_features(padded, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if option.startswith("square"):  # the layers with statistics to report
        assert {k.split(".")[0] for k in aux if k.startswith("block")} == {
            f"block{i}" for i in placement["after_blocks"]
        }


@pytest.mark.parametrize(("option", "overrides"), VARIANTS, ids=VARIANT_IDS)
def test_attentive_head_after_every_fusion_ignores_padding(option, overrides):
    head = partial(AttentiveHead, pos_embed="space_time", max_frames=8, max_tokens=8)
    model = classifier(option, *overrides, head=head).eval()
    real = clip(B=1, frames=3)
    padded, mask = among_padding(real, 5 * clip(B=1, frames=6, seed=1), [0, 2, 5])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask), model(real), rtol=1e-5, atol=1e-5)
        assert model.forward_head(model.forward_features(real)[0], pre_logits=True).shape == (1, 64)


def test_default_placement_keeps_the_state_dict_keys():
    model = classifier("square", randomised=False)
    assert len(model.block_fusions) == 0
    assert {name.split(".")[0] for name in model.state_dict()} == {"backbone", "fusion", "head"}
    assert [n for n in model.state_dict() if n.startswith("fusion.")] == [
        f"fusion.{n}" for n in SQuaReFuse(64, 8).state_dict()
    ]
    # A checkpoint saved before the placement keys existed builds the same model.
    old_cfg = {k: v for k, v in OmegaConf.to_container(fusion_config("square")).items() if not k.startswith("after_")}
    backbone_cfg = dict(
        _target_="squarefuse.models.VideoBackbone",
        name="vit_tiny_patch16_224",
        img_size=IMG,
        model_kwargs=TINY_KWARGS,
    )
    old = build_classifier(backbone_cfg, old_cfg, {"_target_": "squarefuse.models.ClsHead", "_partial_": True}, 5)
    old.load_state_dict(model.state_dict(), strict=True)


def test_placement_children_and_keys():
    model = classifier("temporal_conv", after_backbone=False, after_blocks=(1, 0))
    assert [name for name, _ in model.named_children()] == ["backbone", "fusion", "block_fusions", "head"]
    assert isinstance(model.fusion, NoFusion) and list(model.block_fusions) == ["0", "1"]
    assert model.block_fusions["0"] is not model.block_fusions["1"]  # parameters of their own


def test_identity_layers_after_blocks_give_the_backbone_output():
    """The block-by-block path runs timm's forward_features unchanged."""
    plain = classifier("none", randomised=False).eval()
    inserted = classifier("none", after_blocks=(0, 1), randomised=False).eval()
    inserted.load_state_dict(plain.state_dict())
    video = clip()
    with torch.no_grad():
        torch.testing.assert_close(inserted(video), plain(video), atol=0, rtol=0)


def test_layers_after_blocks_change_the_logits():
    video = clip()
    base = classifier("temporal_conv", randomised=False).eval()
    model = classifier("temporal_conv", after_blocks=(0,)).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(model(video), base(video), atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(after_blocks=(2,)), r"fusion\.after_blocks=\[2\]: 2 is not a block index"),
        (dict(after_blocks=(0, 0)), r"fusion\.after_blocks=\[0, 0\] names a block twice"),
        (dict(after_blocks="0"), r"fusion\.after_blocks must be a list"),
        (dict(after_backbone=False), r"fusion\.after_backbone=false with fusion\.after_blocks=\[\]"),
    ],
)
def test_bad_placements_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        classifier("square", **kwargs)


def test_cls_tokens_need_a_class_token():
    with pytest.raises(ValueError, match="fusion.tokens=cls"):
        VideoClassifier(
            backbone=VideoBackbone(
                "vit_tiny_patch16_224",
                img_size=IMG,
                model_kwargs=dict(TINY_KWARGS, class_token=False, global_pool="avg"),
            ),
            fusion=layer_factory("temporal_attn", "tokens=cls"),
            head=MeanHead,
            num_classes=NUM_CLASSES,
        )


@pytest.mark.slow
def test_time_reversal_needs_a_trend():
    """Mean over time cannot tell a clip from its reversal; SQuaRe-Fuse's odd trend terms can."""
    video = clip(B=2, frames=6)
    reversed_video = video.flip(1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    # Reversing a padded clip: its valid frames reversed, the padding where it was.
    reversed_padded = video.clone()
    reversed_padded[1, :4] = video[1, :4].flip(0)
    reversed_padded[0] = reversed_video[0]
    for option, changes in [("none", False), ("square", True), ("square_light", True), ("temporal_attn", True)]:
        model = classifier(option).eval()
        with torch.no_grad():
            forward, backward = model(video, mask), model(reversed_padded, mask)
        if changes:
            assert (forward - backward).abs().amax(dim=1).min() > 1e-4, option
        else:
            torch.testing.assert_close(forward, backward, atol=1e-5, rtol=1e-5)
    # Quantiles alone are order-blind too.
    model = classifier("square_quantiles_only").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(video, mask), model(reversed_padded, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_time_reversal_after_training_steps():
    """A few optimiser steps from the zero-init start: square learns order-dependent logits."""
    model = classifier("square", randomised=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    video = clip(B=4, frames=4)
    labels = torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(video), labels).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(video) - model(video.flip(1))).abs().amax(dim=1).min() > 1e-5


def test_layer_decay_gives_an_inserted_layer_its_blocks_scale():
    model = classifier("temporal_attn", after_blocks=(0, 1))
    groups = timm.optim.param_groups_layer_decay(
        model, weight_decay=0.05, layer_decay=0.5, no_weight_decay_list=model.no_weight_decay()
    )
    by_param = {id(p): group for group in groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)
    scale = {n: by_param[id(p)]["lr_scale"] for n, p in named.items()}
    decay = {n: by_param[id(p)]["weight_decay"] for n, p in named.items()}
    block0 = scale["backbone.model.blocks.0.attn.qkv.weight"]
    block1 = scale["backbone.model.blocks.1.attn.qkv.weight"]
    assert block0 == pytest.approx(0.25) and block1 == pytest.approx(0.5)
    for name in named:
        if name.startswith("block_fusions.0."):
            assert scale[name] == block0, name
        elif name.startswith("block_fusions.1."):
            assert scale[name] == block1, name
    assert scale["fusion.blocks.0.qkv.weight"] == scale["head.fc.weight"] == 1.0
    assert decay["block_fusions.0.pos_embed"] == decay["fusion.pos_embed"] == 0.0
    assert decay["block_fusions.1.blocks.0.qkv.weight"] == 0.05
    square = classifier("square", after_blocks=(1,))
    assert {"fusion.beta", "block_fusions.1.beta"} <= square.no_weight_decay()


@pytest.mark.parametrize("option", ["square", "temporal_attn", "temporal_shift"])
def test_frozen_backbone_trains_only_fusion_and_head(option):
    model = classifier(option, after_blocks=(0,), freeze=True, drop_path_rate=0.2, randomised=False)
    model.train()
    model(clip()).square().sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] in {"fusion", "block_fusions", "head"} for n in trainable)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    # The inserted layer learns through the frozen blocks that follow it.
    assert sum(p.grad.abs().sum() for p in model.block_fusions.parameters()) > 0


def test_grad_checkpointing_with_layers_after_blocks():
    plain = classifier("temporal_conv", after_blocks=(0, 1), head=MeanHead)
    ckpt = classifier("temporal_conv", after_blocks=(0, 1), head=MeanHead, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    video = clip()
    out_plain, out_ckpt = plain(video), ckpt(video)
    torch.testing.assert_close(out_ckpt, out_plain)
    out_plain.sum().backward()
    out_ckpt.sum().backward()
    for name in ("backbone.model.blocks.0.attn.qkv.weight", "block_fusions.0.mlp.fc1.weight"):
        torch.testing.assert_close(ckpt.get_parameter(name).grad, plain.get_parameter(name).grad)


def test_insertion_needs_a_vision_transformer(monkeypatch):
    monkeypatch.setattr(VideoBackbone, "num_blocks", property(lambda self: None))
    with pytest.raises(ValueError, match="fusion.after_blocks=.*VisionTransformer"):
        classifier("square", after_blocks=(0,))


# ---------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("option", FUSION_OPTIONS)
def test_every_fusion_config_trains_a_step(option, data_root, tmp_path):
    overrides = [o for o in tiny_overrides(data_root) if not o.startswith("fusion.")]
    extra = ["fusion.after_blocks=[1]"] if option == "temporal_attn" else []
    cfg = compose_config("train", [*overrides, f"fusion={option}", "trainer.max_steps=1", "trainer.epochs=1", *extra])
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["status"] == "finished"
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_placement_keys_in_every_option():
    for option in FUSION_OPTIONS:
        cfg = fusion_config(option, "after_blocks=[8,9,10,11]", "after_backbone=false")
        assert list(cfg.after_blocks) == [8, 9, 10, 11] and cfg.after_backbone is False, option
        layer_cfg, placement = split_fusion_config(cfg)
        assert placement == {"after_backbone": False, "after_blocks": [8, 9, 10, 11]}
        assert not {"after_blocks", "after_backbone"} & set(layer_cfg)


@pytest.mark.slow
def test_benchmark_measures_every_option_it_is_given():
    spec = importlib.util.spec_from_file_location("benchmark_fusion", REPO / "scripts" / "benchmark_fusion.py")
    benchmark_fusion = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark_fusion)
    bench = benchmark_fusion.Bench(device=torch.device("cpu"), batch=1, frames=4, img_size=32, amp=False)
    rounds = benchmark_fusion.Rounds(warmup=0, repeats=1, layer_repeats=1)
    result = benchmark_fusion.measure_options(bench, rounds, ["none", "temporal_shift"])
    rows = {row["option"]: row for row in result["rows"]}
    assert list(rows) == ["none", "temporal_shift"] and result["D"] == 768
    assert rows["none"]["params"] == 0 and rows["temporal_shift"]["params"] == 2 * 768 + 8 * 768 * 768 + 5 * 768
    for row in rows.values():
        assert row["share"] == pytest.approx(row["seconds"] / result["backbone_seconds"])
        assert row["seconds"] > 0 and row["seconds_masked"] > 0
