"""Tests of the SQuaRe-Fuse layer (squarefuse/models/fusion/square.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers.configs import fusion_config
from hydra.utils import instantiate
from reference.seed_sketch import SQuaReFuse as SeedSQuaReFuse

from squarefuse.models.classifier import split_fusion_config
from squarefuse.models.fusion import NoFusion, SQuaReFuse, square_fuse

REPO = Path(__file__).resolve().parents[1]
D = 32


def _module(K: int = 4, **kwargs) -> SQuaReFuse:
    torch.manual_seed(0)
    return SQuaReFuse(d_model=D, num_dirs=K, **kwargs)


def _tokens(B: int, T: int, N: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, N, D, generator=torch.Generator().manual_seed(seed))


def _pad(x_real_TND: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
    """Scatters real frames into the True slots of ``valid_T``; padding gets large garbage."""
    T, (N, Dm) = valid_T.numel(), x_real_TND.shape[1:]
    x_TND = 100.0 * torch.randn(T, N, Dm, generator=torch.Generator().manual_seed(7))
    x_TND[valid_T] = x_real_TND
    return x_TND


@pytest.mark.parametrize("K", [1, 4, 8])
def test_shapes_and_dtypes(K: int) -> None:
    m = _module(K=K, quantiles=(0.2, 0.5, 0.8, 0.95), poly_order=1)
    x = _tokens(2, 5, 3)
    h, aux = m(x)
    assert h.shape == x.shape and h.dtype == x.dtype
    assert aux["quantiles"].shape == (2, 3, K, 4)
    assert aux["trend"].shape == (2, 3, K, 2)
    assert not torch.equal(h, x)  # beta_init=0.5: the layer does change the tokens


def test_state_dict_keys_are_the_seeds_with_its_mlp_named_mlp() -> None:
    ours = _module(K=4).state_dict()
    seed = SeedSQuaReFuse(D, num_dirs=4).state_dict()
    assert list(ours) == [k.replace("head.", "mlp.", 1) for k in seed]
    assert all(ours[k].shape == seed[k.replace("mlp.", "head.", 1)].shape for k in ours)


def test_gradients_reach_input_and_every_parameter() -> None:
    m = _module(K=4)
    x = _tokens(2, 6, 3).requires_grad_(True)
    h, aux = m(x, valid_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]]))
    (h * _tokens(2, 6, 3, seed=2)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_forward_does_not_write_into_the_parameter() -> None:
    m = _module(K=4)
    before = m.proj.weight.detach().clone()
    m(_tokens(2, 5, 3))
    assert torch.equal(m.proj.weight, before)
    U = m.directions()
    assert torch.allclose(U.t() @ U, torch.eye(4), atol=1e-5)


@pytest.mark.parametrize("seed_ran_once", [False, True], ids=["fresh", "after_one_forward"])
def test_seed_state_dict_loads_strict_and_reproduces_seed_output(seed_ran_once: bool) -> None:
    torch.manual_seed(3)
    seed = SeedSQuaReFuse(D, num_dirs=8, quantiles=(0.1, 0.5, 0.9), poly_order=2, beta_init=0.5)
    x = _tokens(2, 16, 5, seed=4)
    if seed_ran_once:
        seed(_tokens(2, 16, 5, seed=5))  # its weight now holds an orthonormal matrix
    ours = SQuaReFuse(D, num_dirs=8)
    ours.load_state_dict(copy.deepcopy(seed.state_dict()), strict=True)
    h, _ = ours(x)
    h_seed = seed(x)
    torch.testing.assert_close(h, h_seed, atol=1e-4, rtol=0)
    # Drop-in: the seed's own call convention works.
    h2, _ = ours(x, valid_mask=torch.ones(2, 16, 5))
    torch.testing.assert_close(h2, h_seed, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["end", "interleaved"])
def test_padding_is_as_if_absent_with_clip_mask(layout: str) -> None:
    m = _module(K=4)
    T, N, lengths = 12, 3, [7, 12]
    real = [_tokens(1, L, N, seed=10 + L) for L in lengths]
    g = torch.Generator().manual_seed(0)
    valid_BT = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, L in enumerate(lengths):
        slots = torch.arange(L) if layout == "end" else torch.randperm(T, generator=g)[:L].sort().values
        valid_BT[b, slots] = True
    x = torch.stack([_pad(r[0], valid_BT[b]) for b, r in enumerate(real)])

    h, aux = m(x, valid_mask=valid_BT)
    for b, r in enumerate(real):
        h_ref, aux_ref = m(r)
        torch.testing.assert_close(h[b, valid_BT[b]], h_ref[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(aux["quantiles"][b], aux_ref["quantiles"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(aux["trend"][b], aux_ref["trend"][0], atol=1e-5, rtol=0)
    assert torch.equal(h[~valid_BT], x[~valid_BT])
    # The garbage padding would change the result if it were not masked out.
    h_unmasked, _ = m(x)
    assert not torch.allclose(h_unmasked[0, valid_BT[0]], h[0, valid_BT[0]], atol=1e-3)


def test_padding_is_as_if_absent_with_per_token_mask() -> None:
    m = _module(K=4)
    T, N = 10, 4
    g = torch.Generator().manual_seed(1)
    valid_BTN = torch.rand(2, T, N, generator=g) < 0.6
    valid_BTN[0, :, 0] = True  # one full-length token
    valid_BTN[1, :, 1] = False  # one token with no valid frame
    valid_BTN[1, 3, 1] = True  # ... then a single one
    x = 100.0 * _tokens(2, T, N, seed=2)  # garbage everywhere; real frames below
    real = {}
    for b in range(2):
        for n in range(N):
            L = int(valid_BTN[b, :, n].sum())
            real[b, n] = _tokens(1, L, 1, seed=100 + 10 * b + n)
            x[b, valid_BTN[b, :, n], n] = real[b, n][0, :, 0]

    h, _ = m(x, valid_mask=valid_BTN)
    for (b, n), r in real.items():
        h_ref, _ = m(r)
        torch.testing.assert_close(h[b, valid_BTN[b, :, n], n], h_ref[0, :, 0], atol=1e-5, rtol=0)
    assert torch.equal(h[~valid_BTN], x[~valid_BTN])


def test_mask_encodings_agree() -> None:
    m = _module(K=4)
    x = _tokens(2, 8, 3)
    valid = torch.rand(2, 8, 3, generator=torch.Generator().manual_seed(3)) < 0.7
    h_bool, _ = m(x, valid_mask=valid)
    h_int, _ = m(x, valid_mask=valid.long())
    h_float, _ = m(x, valid_mask=valid.float())
    assert torch.equal(h_bool, h_int) and torch.equal(h_bool, h_float)
    # [B,T] broadcasts over N exactly like the expanded [B,T,N] mask.
    clip = valid[:, :, 0]
    h_clip, _ = m(x, valid_mask=clip)
    h_expanded, _ = m(x, valid_mask=clip[:, :, None].expand(2, 8, 3))
    assert torch.equal(h_clip, h_expanded)
    # An all-valid mask is the unmasked fast path.
    h_none, aux_none = m(x)
    h_ones, aux_ones = m(x, valid_mask=torch.ones(2, 8, dtype=torch.bool))
    torch.testing.assert_close(h_ones, h_none, atol=1e-6, rtol=0)
    torch.testing.assert_close(aux_ones["trend"], aux_none["trend"], atol=1e-6, rtol=0)


def test_no_valid_frame_gives_x_without_nan() -> None:
    m = _module(K=4)
    x = _tokens(2, 6, 3).requires_grad_(True)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1] = False
    h, aux = m(x, valid_mask=valid)
    assert torch.isfinite(h).all()
    assert torch.equal(h[1], x[1])
    assert torch.equal(aux["quantiles"][1], torch.zeros_like(aux["quantiles"][1]))
    h.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("masked", [False, True])
def test_time_reversal_flips_odd_trend_only(masked: bool) -> None:
    m = _module(K=4, poly_order=3)
    x = _tokens(2, 9, 3)
    valid = None
    if masked:
        valid = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 0]]).bool()
    _, aux = m(x, valid_mask=valid)
    _, aux_rev = m(x.flip(1), valid_mask=None if valid is None else valid.flip(1))
    torch.testing.assert_close(aux_rev["quantiles"], aux["quantiles"], atol=1e-5, rtol=0)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    torch.testing.assert_close(aux_rev["trend"], aux["trend"] * sign, atol=1e-5, rtol=0)
    assert aux["trend"][..., 1].abs().max() > 1e-2  # the odd terms are not trivially zero


def test_quantiles_invariant_to_time_permutation() -> None:
    m = _module(K=4)
    x = _tokens(2, 11, 3)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(5))
    _, aux = m(x)
    _, aux_perm = m(x[:, perm])
    torch.testing.assert_close(aux_perm["quantiles"], aux["quantiles"], atol=1e-5, rtol=0)
    assert not torch.allclose(aux_perm["trend"], aux["trend"], atol=1e-3)


def test_small_sigma_gives_order_statistics() -> None:
    levels = (0.1, 0.5, 0.9)
    m = square_fuse(d_model=D, K=4, quantiles=levels, P=2, sigma=1e-4)
    T, N = 10, 2
    x = _tokens(2, T, N)
    valid = torch.zeros(2, T, dtype=torch.bool)
    valid[0, :9] = True  # L=9: q*(L-1) = 0.8, 4, 7.2
    valid[1, [0, 2, 3, 5, 6, 8, 9]] = True  # L=7: q*(L-1) = 0.6, 3, 5.4
    _, aux = m(x, valid_mask=valid)
    with torch.no_grad():
        v_BTNK = x @ m.directions()
    for b in range(2):
        L = int(valid[b].sum())
        ranks = [round(q * (L - 1)) for q in levels]
        sorted_NKL = v_BTNK[b, valid[b]].permute(1, 2, 0).sort(dim=-1).values
        torch.testing.assert_close(aux["quantiles"][b], sorted_NKL[..., ranks], atol=1e-5, rtol=0)
    # The default width is not the order statistic.
    m_default = square_fuse(d_model=D, K=4, quantiles=levels, P=2)
    m_default.load_state_dict(m.state_dict())
    _, aux_default = m_default(x, valid_mask=valid)
    assert not torch.allclose(aux_default["quantiles"], aux["quantiles"], atol=1e-3)


def test_bf16_autocast_and_bf16_module() -> None:
    m = _module(K=4)
    x = _tokens(2, 8, 3)
    valid = torch.tensor([[1] * 8, [1] * 5 + [0] * 3]).bool()
    h_ref, aux_ref = m(x, valid_mask=valid)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, aux = m(x, valid_mask=valid)
    assert h.dtype == torch.float32 and aux["quantiles"].dtype == torch.float32
    torch.testing.assert_close(h, h_ref, atol=5e-2, rtol=0)
    torch.testing.assert_close(aux["quantiles"], aux_ref["quantiles"], atol=1e-5, rtol=0)

    m_bf16 = copy.deepcopy(m).to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16).requires_grad_(True)
    h, aux = m_bf16(x_bf16, valid_mask=valid)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.float(), h_ref, atol=1e-1, rtol=0)
    h.float().sum().backward()
    assert torch.isfinite(x_bf16.grad.float()).all()
    assert m_bf16.proj.weight.grad.dtype == torch.bfloat16


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    m = _module(K=4)
    compiled = torch.compile(m, fullgraph=True)
    x = _tokens(2, 8, 3)
    valid = torch.rand(2, 8, 3, generator=torch.Generator().manual_seed(4)) < 0.7
    for mask in (None, valid):
        xe = x.clone().requires_grad_(True)
        xc = x.clone().requires_grad_(True)
        h_eager, aux_eager = m(xe, valid_mask=mask)
        h_eager.pow(2).sum().backward()
        grads_eager = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        h_comp, aux_comp = compiled(xc, valid_mask=mask)
        h_comp.pow(2).sum().backward()
        torch.testing.assert_close(h_comp, h_eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(aux_comp["trend"], aux_eager["trend"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-4, rtol=1e-4)
        for g_comp, g_eager in zip([p.grad for p in m.parameters()], grads_eager, strict=True):
            torch.testing.assert_close(g_comp, g_eager, atol=1e-4, rtol=1e-4)
        m.zero_grad()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(K=0), "fusion.K"),
        (dict(K=D + 1), "fusion.K"),
        (dict(quantiles=(0.1, 1.5)), "fusion.quantiles"),
        (dict(quantiles=()), "fusion.quantiles"),
        (dict(P=-1), "fusion.P"),
        (dict(sigma=0.0), "fusion.sigma"),
        (dict(sigma=-1.0), "fusion.sigma"),
    ],
)
def test_square_fuse_validation_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        square_fuse(d_model=D, **kwargs)


def test_hydra_config_builds_the_layer() -> None:
    layer_cfg, placement = split_fusion_config(fusion_config("square", "K=4"))
    assert placement == {"after_backbone": True, "after_blocks": []}
    m = instantiate(layer_cfg)(d_model=D)
    assert isinstance(m, SQuaReFuse) and m.num_dirs == 4 and m.quantiles == (0.1, 0.5, 0.9)
    h, _ = m(_tokens(1, 4, 2))
    assert h.shape == (1, 4, 2, D)


def test_bad_shapes_raise() -> None:
    m = _module(K=4)
    with pytest.raises(ValueError, match="valid_mask"):
        m(_tokens(2, 5, 3), valid_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 5, 3, D + 1))


def test_no_fusion_is_identity() -> None:
    x = _tokens(2, 5, 3)
    h, aux = NoFusion(d_model=D)(x, valid_mask=torch.ones(2, 5))
    assert h is x and aux == {}
    m = instantiate(split_fusion_config(fusion_config("none"))[0])(d_model=D)
    assert isinstance(m, NoFusion)


def test_a_state_dict_with_the_fusions_mlp_named_head_loads_as_mlp():
    """Checkpoints written before the rename (and the seed's sketch) call the MLP `head`; inside a
    classifier that was `fusion.head.*`, beside the classifier's `head.*`. Both load strictly."""
    torch.manual_seed(0)
    layer = SQuaReFuse(D, num_dirs=4)
    old = {k.replace("mlp.", "head.", 1): v.clone() for k, v in layer.state_dict().items()}
    assert any(k.startswith("head.") for k in old) and not any(k.startswith("mlp.") for k in old)
    fresh = SQuaReFuse(D, num_dirs=4)
    fresh.load_state_dict(old, strict=True)
    x = torch.randn(2, 5, 3, D)
    torch.testing.assert_close(fresh(x)[0], layer(x)[0], rtol=0, atol=0)
    wrapped = torch.nn.ModuleDict({"fusion": SQuaReFuse(D, num_dirs=4)})
    wrapped.load_state_dict({f"fusion.{k}": v for k, v in old.items()}, strict=True)
    assert set(wrapped.state_dict()) == {f"fusion.{k}" for k in layer.state_dict()}
