"""SQuaRe-Fuse: Sliced-Quantile & Quadratic-trend Robust Fusion over time.

The layer fuses per-frame ViT tokens ``x`` [B,T,N,D] over time. Each token's time series is
projected onto ``K`` learned orthonormal directions; per direction it takes soft quantiles
over time (a sliced, permutation-invariant summary) and the coefficients on a Legendre basis
of order ``0..P`` (the trend, whose odd terms tell "forwards" from "backwards"). A small MLP
maps these statistics back to ``D`` and they are added to every frame of the token.

Invalid frames (``valid_mask``) are ignored as if the clip consisted of its valid frames only:
statistics depend on the number of valid frames ``L`` of each sequence, through tables
precomputed for every ``L`` in ``0..T`` so that a batch of varying lengths costs one gather.

State-dict keys are ``proj.weight``, ``mlp.{0,1,3}.*`` and ``beta``. The seed design's sketch called
the MLP ``head``, a name that sat beside the classifier's own ``head.*`` in a model's state dict; its
state dicts (and squarefuse checkpoints written before the rename) still load with ``strict=True``
and give the same outputs: ``head.*`` keys are read as ``mlp.*`` (`_load_from_state_dict`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from squarefuse.models.fusion.common import ArgumentError, check_int, check_shape, valid_btn

__all__ = ["SQuaReFuse", "square_fuse"]


def _validate_hparams(
    *,
    d_model: int,
    num_dirs: int,
    quantiles: Sequence[float] | None,
    poly_order: int | None,
    sigma: float | None,
) -> None:
    """Raises ArgumentError naming the offending argument of ``SQuaReFuse``."""
    check_int(d_model, "d_model", minimum=1)
    check_int(num_dirs, "num_dirs", minimum=1)
    if num_dirs > d_model:
        # QR of a [D, K] matrix cannot give more than D orthonormal directions.
        raise ArgumentError("num_dirs", f"must be <= d_model={d_model}, got {num_dirs}")
    if quantiles is not None:
        if isinstance(quantiles, (str, bytes)) or not isinstance(quantiles, Sequence) or len(quantiles) == 0:
            raise ArgumentError(
                "quantiles", f"must be a non-empty list of levels in [0, 1], or null for none, got {quantiles!r}"
            )
        for q in quantiles:
            if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 <= float(q) <= 1.0:
                raise ArgumentError("quantiles", f"levels must be numbers in [0, 1], got {q!r} in {list(quantiles)}")
    if poly_order is not None:
        check_int(poly_order, "poly_order", minimum=0)
    if quantiles is None and poly_order is None:
        raise ArgumentError("quantiles", "is null and the trend is off as well: the layer would have no statistic")
    if sigma is not None:
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0.0 < float(sigma) < math.inf:
            raise ArgumentError("sigma", f"must be a finite number > 0 or null, got {sigma!r}")


def _quantile_weight_table(T: int, levels: Sequence[float], sigma: float | None, device: torch.device) -> Tensor:
    """Soft-quantile weights over ranks for every number of valid frames.

    Args:
        T: Padded clip length.
        levels: Quantile levels ``q`` in [0, 1].
        sigma: Fixed Gaussian width over ranks, or None for ``max(0.5, L / 16)``; as in the
            seed, widths below 1e-6 are taken as 1e-6.
        device: Where to build the table.

    Returns:
        fp32 [T+1, Q, T]: row ``L`` weights ranks ``0..L-1`` by a Gaussian around
        ``q * (L - 1)``, normalised to sum to 1; ranks ``>= L`` and the whole ``L = 0`` row are 0.
    """
    L = torch.arange(T + 1, device=device, dtype=torch.float32)[:, None, None]  # [T+1,1,1]
    q = torch.tensor(levels, device=device, dtype=torch.float32)[None, :, None]  # [1,Q,1]
    rank = torch.arange(T, device=device, dtype=torch.float32)[None, None, :]  # [1,1,T]
    width = torch.full_like(L, max(sigma, 1e-6)) if sigma is not None else (L / 16).clamp_min(0.5)
    dist2 = ((rank - q * (L - 1)) ** 2).masked_fill(rank >= L, math.inf)
    # Shifting by the nearest rank's distance leaves the softmax unchanged but keeps it exact
    # as sigma -> 0 (one-hot on the nearest rank), where plain exponentials all underflow.
    logits = -0.5 * (dist2 - dist2.amin(dim=-1, keepdim=True)) / width**2
    weights = torch.softmax(logits, dim=-1)
    return torch.where(L > 0, weights, 0.0)  # the L = 0 row is NaN (no valid rank)


def _legendre_table(T: int, order: int, device: torch.device) -> Tensor:
    """Row-normalised discrete Legendre bases for every number of valid frames.

    Args:
        T: Padded clip length.
        order: Highest polynomial order ``P``.
        device: Where to build the table.

    Returns:
        fp32 [T+1, P+1, T]: row ``L`` holds ``P_0..P_P`` at ``t = linspace(-1, 1, L)`` in
        positions ``0..L-1`` (zero beyond), each row divided by ``sqrt(max(sum sq, 1e-6))``
        as in the seed's ``_legendre_basis``.
    """
    L = torch.arange(T + 1, device=device, dtype=torch.float32)[:, None]  # [T+1,1]
    pos = torch.arange(T, device=device, dtype=torch.float32)[None, :]  # [1,T]
    inside = pos < L
    # linspace(-1, 1, 1) is [-1]: the clamp keeps that case.
    t = (-1.0 + 2.0 * pos / (L - 1).clamp_min(1.0)) * inside
    polys = [torch.ones_like(t), t]
    for n in range(1, order):
        polys.append(((2 * n + 1) * t * polys[n] - n * polys[n - 1]) / (n + 1))
    basis = torch.stack(polys[: order + 1], dim=1) * inside[:, None, :]  # [T+1,P+1,T]
    return basis / basis.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-6).sqrt()


class SQuaReFuse(nn.Module):
    """Sliced-Quantile & Quadratic-trend Robust Fusion of tokens over time.

    Args:
        d_model: Token width ``D``.
        num_dirs: Number of orthonormal projection directions ``K`` (``K <= D``).
        quantiles: Soft-quantile levels in [0, 1]; None for the trend-only ablation.
        poly_order: Highest Legendre order ``P`` of the trend; None for the quantiles-only
            ablation (no trend).
        beta_init: Initial residual scale ``beta``.
        sigma: Fixed Gaussian width over ranks for the soft quantiles; None uses
            ``max(0.5, L / 16)`` with ``L`` the number of valid frames of each sequence.

    Raises:
        ArgumentError: (a ValueError) naming the offending argument.
    """

    def __init__(
        self,
        d_model: int,
        num_dirs: int = 8,
        quantiles: Sequence[float] | None = (0.1, 0.5, 0.9),
        poly_order: int | None = 2,
        beta_init: float = 0.5,
        sigma: float | None = None,
    ) -> None:
        super().__init__()
        _validate_hparams(d_model=d_model, num_dirs=num_dirs, quantiles=quantiles, poly_order=poly_order, sigma=sigma)
        d_model, num_dirs = int(d_model), int(num_dirs)
        self.d_model = d_model
        self.num_dirs = num_dirs
        self.quantiles = () if quantiles is None else tuple(float(q) for q in quantiles)
        self.poly_order = None if poly_order is None else int(poly_order)
        self.sigma = None if sigma is None else float(sigma)

        self.proj = nn.Linear(d_model, num_dirs, bias=False)
        nn.init.kaiming_uniform_(self.proj.weight, a=math.sqrt(5))
        num_trend = 0 if self.poly_order is None else self.poly_order + 1
        num_feats = num_dirs * (len(self.quantiles) + num_trend)
        self.mlp = nn.Sequential(
            nn.LayerNorm(num_feats),
            nn.Linear(num_feats, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
        )
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))
        # U fixed by `freeze_directions` (export); non-persistent, so state dicts do not change.
        self.register_buffer("frozen_directions", None, persistent=False)
        # (T, device) -> tables of _get_tables. A plain cache, not buffers: T is only known at
        # run time and seed checkpoints must load with strict=True.
        self._tables: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The seed's (and older checkpoints') name for the MLP: `head.*` -> `mlp.*`.
        for key in [k for k in state_dict if k.startswith(prefix + "head.")]:
            state_dict[prefix + "mlp." + key[len(prefix + "head.") :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, K={self.num_dirs}, quantiles={self.quantiles}, "
            f"P={self.poly_order}, sigma={self.sigma}"
        )

    def no_weight_decay(self) -> set[str]:
        """The residual gate is a learned scale, like a norm weight: decaying it would pull the
        layer towards switching itself off."""
        return {"beta"}

    def directions(self) -> Tensor:
        """Orthonormal directions U [D, K], fp32, differentiable w.r.t. ``proj.weight``.

        Householder QR (``torch.linalg.qr``) with its Q used as is, as the seed does, so a
        seed checkpoint gives the seed's directions. The parameter itself is never modified.
        Note that LAPACK's convention makes the sign of a column of Q jump when the leading
        entry it is computed from crosses zero (diag(R) is not kept positive).
        """
        if self.frozen_directions is not None:
            return self.frozen_directions
        q_DK, _ = torch.linalg.qr(self.proj.weight.float().t(), mode="reduced")
        return q_DK

    def freeze_directions(self, frozen: bool = True) -> None:
        """Compute U once now and use that constant in every later forward (or go back to QR).

        For export: the graph then holds U as a constant instead of a QR, which ONNX lacks.
        Later changes to ``proj.weight`` are ignored until ``freeze_directions(False)``.
        """
        self.frozen_directions = self.directions().detach().clone() if frozen else None

    def _get_tables(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(quantile weights [T+1,Q,T], Legendre basis [T+1,P+1,T]), fp32, cached per (T, device)."""
        if torch.compiler.is_compiling():
            # Built inside the graph (a few tiny kernels on constants): filling the cache while
            # tracing would change the guards and force a recompile on the next call.
            return self._build_tables(T, device)
        key = (T, device)
        if key not in self._tables:
            self._tables[key] = self._build_tables(T, device)
        return self._tables[key]

    def _build_tables(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        # The ablations keep tables with an empty statistic axis ([T+1,0,T]) so that the
        # computation below has one path.
        if self.quantiles:
            quant_w_LQT = _quantile_weight_table(T, self.quantiles, self.sigma, device)
        else:
            quant_w_LQT = torch.zeros(T + 1, 0, T, device=device)
        if self.poly_order is not None:
            basis_LPT = _legendre_table(T, self.poly_order, device)
        else:
            basis_LPT = torch.zeros(T + 1, 0, T, device=device)
        return quant_w_LQT, basis_LPT

    def _valid_btn(self, valid_mask: Tensor, x: Tensor) -> Tensor:
        """Boolean validity [B,T,N] from a [B,T] or [B,T,N] bool or 0/1 mask."""
        return valid_btn(valid_mask, x)

    def statistics(self, x: Tensor, valid_BTN: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Soft quantiles and Legendre trend of each token's projected time series.

        Computed in fp32 whatever the autocast or parameter dtype: the sort and the QR need
        the precision, and their cost is negligible next to the backbone.

        Args:
            x: Tokens [B,T,N,D].
            valid_BTN: Optional boolean validity [B,T,N]; None means every frame is valid.

        Returns:
            ``(quantiles [B,N,K,Q], trend [B,N,K,P+1])``, fp32; both zero where a sequence
            has no valid frame. An ablated statistic has an empty last axis.
        """
        T = x.shape[1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            quant_w_LQT, basis_LPT = self._get_tables(T, x.device)
            v_BNKT = torch.matmul(x.float(), self.directions()).permute(0, 2, 3, 1)
            if not self.quantiles:
                quantiles_BNKQ = v_BNKT.new_zeros(*v_BNKT.shape[:-1], 0)
            if valid_BTN is None:
                if self.quantiles:
                    quantiles_BNKQ = torch.matmul(v_BNKT.sort(dim=-1).values, quant_w_LQT[T].t())
                trend_BNKP = torch.matmul(v_BNKT, basis_LPT[T].t())
                return quantiles_BNKQ, trend_BNKP

            valid_BN1T = valid_BTN.permute(0, 2, 1)[:, :, None, :]
            num_valid_BN = valid_BN1T.sum(dim=-1)[:, :, 0]
            if self.quantiles:
                # Padding sorts last (+inf) and is then zeroed: the first L ranks hold the sorted
                # valid values, and row L of the table weights only those.
                sorted_BNKT = v_BNKT.masked_fill(~valid_BN1T, math.inf).sort(dim=-1).values
                beyond_BN1T = torch.arange(T, device=x.device) >= num_valid_BN[:, :, None, None]
                sorted_BNKT = sorted_BNKT.masked_fill(beyond_BN1T, 0.0)
                quantiles_BNKQ = torch.matmul(sorted_BNKT, quant_w_LQT[num_valid_BN].transpose(-1, -2))
            # Each valid frame takes the basis value of its rank among the valid frames, so
            # padding anywhere (interleaved too) is as if it were not there.
            rank_BN1T = (valid_BN1T.cumsum(dim=-1) - 1).clamp_min(0)
            order_P1 = torch.arange(basis_LPT.shape[1], device=x.device)[:, None]
            basis_BNPT = basis_LPT[num_valid_BN[:, :, None, None], order_P1, rank_BN1T]
            basis_BNPT = basis_BNPT.masked_fill(~valid_BN1T, 0.0)
            trend_BNKP = torch.matmul(v_BNKT.masked_fill(~valid_BN1T, 0.0), basis_BNPT.transpose(-1, -2))
            return quantiles_BNKQ, trend_BNKP

    def forward(self, x: Tensor, valid_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Fuses tokens over time.

        Args:
            x: Tokens [B,T,N,D].
            valid_mask: Optional [B,T] (shared by all tokens) or [B,T,N] mask, bool or 0/1;
                False/0 marks padding frames.

        Returns:
            ``(h, aux)``: ``h`` [B,T,N,D] in ``x``'s dtype, equal to ``x`` at invalid
            positions; ``aux`` holds the fused statistics in fp32, ``"quantiles"``
            [B,N,K,Q] and ``"trend"`` [B,N,K,P+1] (zero for sequences with no valid frame).
        """
        check_shape(x, self.d_model)
        valid_BTN = None if valid_mask is None else self._valid_btn(valid_mask, x)
        quantiles_BNKQ, trend_BNKP = self.statistics(x, valid_BTN)
        feats_BNF = torch.cat([quantiles_BNKQ, trend_BNKP], dim=-1).flatten(2)
        # The MLP follows the parameter dtype and autocast like any other layer.
        y_BND = self.mlp(feats_BNF.to(self.mlp[0].weight.dtype))
        update_B1ND = (self.beta * y_BND).to(x.dtype)[:, None]
        if valid_BTN is None:
            h_BTND = x + update_B1ND
        else:
            # x + 0 * update is exactly x on invalid positions, in one fused pass (with a
            # cheaper backward than torch.where over [B,T,N,D]).
            h_BTND = torch.addcmul(x, valid_BTN[..., None].to(x.dtype), update_B1ND)
        return h_BTND, {"quantiles": quantiles_BNKQ, "trend": trend_BNKP}


# The fusion config speaks the paper's symbols (fusion.K, fusion.P), SQuaReFuse the seed's keywords
# (a drop-in for the seed's module): this is the one place that maps one onto the other.
_CONFIG_KEYS = {
    "d_model": "d_model",
    "num_dirs": "fusion.K",
    "quantiles": "fusion.quantiles",
    "poly_order": "fusion.P",
    "sigma": "fusion.sigma",
}


def square_fuse(d_model: int, K: int = 8, P: int | None = 2, **layer_kwargs: Any) -> SQuaReFuse:
    """Builds SQuaRe-Fuse from the Hydra group ``fusion`` (paper symbols ``K`` and ``P``).

    Args:
        d_model: Token width ``D`` of the backbone.
        K: Number of projection directions (``num_dirs``), ``1 <= K <= d_model``.
        P: Highest Legendre order of the trend (``poly_order``), ``>= 0``; None is the quantiles-only ablation.
        **layer_kwargs: ``quantiles``, ``beta_init``, ``sigma``, as `SQuaReFuse` takes them.

    Raises:
        ValueError: naming the ``fusion.*`` key of an invalid value.
    """
    quantiles = layer_kwargs.get("quantiles")
    # Hydra hands quantiles over as a ListConfig: store a plain tuple.
    if not isinstance(quantiles, (str, bytes)) and isinstance(quantiles, Sequence):
        layer_kwargs["quantiles"] = tuple(quantiles)
    try:
        return SQuaReFuse(d_model=d_model, num_dirs=K, poly_order=P, **layer_kwargs)
    except ArgumentError as e:
        raise ValueError(f"{_CONFIG_KEYS[e.key]} {e.problem}") from None
