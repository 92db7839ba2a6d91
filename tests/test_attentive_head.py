"""``head=attentive``: the attentive probe reads out every token, honours padding, compares positions."""

from __future__ import annotations

import pytest
import torch
from helpers.clips import among_padding
from helpers.configs import CONFIG_DIR
from hydra.utils import instantiate
from omegaconf import OmegaConf

from squarefuse.models.heads import AttentiveHead, MeanHead

D = 128  # two heads of 64
NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def head(*overrides: str, embed_dim: int = D, randomised: bool = True) -> AttentiveHead:
    """The head as configs/head/attentive.yaml builds it; randomised so that attention is far from uniform."""
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "head" / "attentive.yaml"), OmegaConf.from_dotlist(overrides))
    torch.manual_seed(0)
    module = instantiate(cfg, _convert_="all")(
        embed_dim=embed_dim, num_classes=NUM_CLASSES, num_prefix_tokens=1, has_class_token=True
    )
    if randomised:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return module.eval()


def tokens(B: int, T: int, N: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, N, D, generator=torch.Generator().manual_seed(seed))


def test_config_builds_the_v_jepa_probe():
    probe = head("max_frames=8", "max_tokens=16", randomised=False)
    assert probe.num_heads == D // 64 and len(probe.blocks) == 1 and probe.pos_embed == "none"
    assert probe.blocks[0].mlp.fc1.out_features == 4 * D
    assert probe.query.shape == (1, 1, D) and 0 < probe.query.std() < 0.03
    assert not hasattr(probe, "time_embed")  # no position parameters unless asked for
    with_pos = head("pos_embed=space_time", "max_frames=8", "max_tokens=16", randomised=False)
    assert with_pos.time_embed.shape == (8, D) and with_pos.space_embed.shape == (16, D)
    assert head(embed_dim=32, randomised=False).num_heads == 1  # D // 64, at least 1


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("pos_embed=sincos", "head.pos_embed"),
        ("num_heads=3", "head.num_heads"),
        ("depth=0", "head.depth"),
        ("mlp_ratio=0", "head.mlp_ratio"),
        ("max_frames=0", "head.max_frames"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        head(override, randomised=False)


def test_too_long_clips_for_the_position_embeddings_name_the_keys():
    probe = head("pos_embed=space_time", "max_frames=4", "max_tokens=3")
    with pytest.raises(ValueError, match=r"head.max_frames=4 and head.max_tokens=3.*5 frames of 3 tokens"):
        probe(tokens(1, 5, 3))
    with pytest.raises(ValueError, match=r"6 frames of 4 tokens"):
        head("pos_embed=space_time", "max_frames=8", "max_tokens=3")(tokens(1, 6, 4))


@pytest.mark.parametrize("pos_embed", ["none", "space_time"])
@pytest.mark.parametrize("layout", ["end", "interleaved"])
@pytest.mark.parametrize("mask_kind", ["BT", "BTN"])
def test_a_padded_clip_gives_the_unpadded_clips_logits(pos_embed, layout, mask_kind):
    probe = head(f"pos_embed={pos_embed}")
    real = tokens(1, 3, 4)
    positions = [0, 1, 2] if layout == "end" else [1, 3, 4]
    padding = torch.full((1, 6, 4, D), float("nan"))
    padding[0, 5] = 1e6  # NaN and huge values: padding must not reach the keys or the values
    padded, mask = among_padding(real, padding, positions)
    if mask_kind == "BTN":
        mask = mask[:, :, None].expand(1, 6, 4).to(torch.int64)  # 0/1 per token
    with torch.no_grad():
        expected = probe(real)
        got = probe(padded, mask)
        features = probe(padded, mask, pre_logits=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert features.shape == (1, D)
    torch.testing.assert_close(probe.fc(features), got, rtol=1e-5, atol=1e-5)


def test_a_batch_mixing_padded_and_full_clips_matches_each_clip_alone():
    probe = head("pos_embed=space_time")
    x = tokens(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        batch = probe(x, mask)
        alone = torch.cat([probe(x[i : i + 1, mask[i]]) for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)


def test_masked_tokens_are_read_as_absent():
    """A [B,T,N] mask drops single tokens: without a space embedding, as if they were not there."""
    probe = head()
    x = tokens(1, 3, 5)
    mask = torch.ones(1, 3, 5, dtype=torch.bool)
    mask[:, :, 2] = False
    with torch.no_grad():
        torch.testing.assert_close(probe(x, mask), probe(x[:, :, mask[0, 0]]), rtol=1e-5, atol=1e-5)


def test_it_compares_positions_and_frames_where_a_mean_cannot():
    """Two flashes, left then right, against right then left: the same tokens in another order."""
    x = torch.zeros(1, 4, 3, D)
    flash = torch.randn(D, generator=torch.Generator().manual_seed(3))
    left_then_right = x.clone()
    left_then_right[0, 1, 1] = flash
    left_then_right[0, 2, 2] = flash
    right_then_left = left_then_right.flip(1)  # time reversed
    swapped_places = left_then_right[:, :, [0, 2, 1]]  # the same frames, left and right swapped
    mean = MeanHead(embed_dim=D, num_classes=NUM_CLASSES, num_prefix_tokens=1, has_class_token=True)
    blind = head()  # V-JEPA's default: no positions, so order- and place-blind on these tokens
    seeing = head("pos_embed=space_time")
    with torch.no_grad():
        for readout, sees in [(mean, False), (blind, False), (seeing, True)]:
            reference = readout(left_then_right)
            for other in (right_then_left, swapped_places):
                gap = (readout(other) - reference).abs().max().item()
                assert (gap > 1e-3) if sees else (gap < 1e-5), (type(readout).__name__, gap)


def test_every_parameter_learns_from_step_0():
    probe = head("pos_embed=space_time", "max_frames=8", "max_tokens=8", randomised=False).train()
    logits = probe(tokens(2, 4, 3))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    kv_bias = probe.blocks[0].kv.bias
    # The key bias adds the same q . b_k to every score of a query, which the softmax removes: it is
    # the one parameter no loss can move (textbook attention gives it a gradient of rounding noise).
    assert kv_bias.grad is not None and torch.equal(kv_bias.grad[:D], torch.zeros(D))
    grads = {name: p.grad for name, p in probe.named_parameters()} | {"blocks.0.kv.bias": kv_bias.grad[D:]}
    silent = [name for name, grad in grads.items() if grad is None or not grad[:4].abs().sum() > 0]
    assert silent == []  # the positions used (4 frames, 3 tokens) get a gradient at once


def textbook_block(block, query_B1D, tokens_BSD, keys_B11S):
    """The cross-attention block as usually written: every token projected to a key and a value."""
    B, S, D = tokens_BSD.shape
    H, hd = block.heads, D // block.heads
    k, v = block.kv(block.norm1(tokens_BSD)).reshape(B, S, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q = block.q(query_B1D).reshape(B, 1, H, hd).transpose(1, 2)
    attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys_B11S)
    query_B1D = query_B1D + block.proj(attended.transpose(1, 2).reshape(B, 1, D))
    return query_B1D + block.mlp(block.norm2(query_B1D))


@pytest.mark.parametrize("masked", [False, True])
def test_the_block_is_textbook_cross_attention_without_projecting_every_token(masked):
    # In float64, so that the two orders of the same sums agree to far below any tolerance's size.
    block = head().blocks[0].double()  # two heads, every weight and bias far from zero
    assert block.heads == 2 and block.kv.bias[:D].abs().min() > 0
    g = torch.Generator().manual_seed(5)
    query, x = (torch.randn(3, size, D, generator=g, dtype=torch.float64) for size in (1, 7))
    keys = (torch.rand(3, 1, 1, 7, generator=g) > 0.4) | (torch.arange(7) == 0) if masked else None
    fast, textbook = block(query, x, None, keys), textbook_block(block, query, x, keys)
    torch.testing.assert_close(fast, textbook, rtol=1e-10, atol=1e-10)
    x.requires_grad_(True)
    fast, textbook = block(query, x, None, keys), textbook_block(block, query, x, keys)
    grads = [torch.autograd.grad(out.square().sum(), [x, *block.parameters()]) for out in (fast, textbook)]
    for name, a, b in zip(["tokens", *(n for n, _ in block.named_parameters())], *grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_query_and_position_embeddings_get_no_weight_decay():
    assert head(randomised=False).no_weight_decay() == {"query"}
    probe = head("pos_embed=space_time", randomised=False)
    assert probe.no_weight_decay() == {"query", "time_embed", "space_embed"}
    assert probe.no_weight_decay() <= {name for name, _ in probe.named_parameters()}
