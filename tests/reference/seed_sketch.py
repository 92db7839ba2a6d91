"""Reference, not used by the framework: the seed design's ``SQuaReFuse`` sketch, copied verbatim.

Kept with the tests as the oracle of the seed-compatibility tests (``from reference.seed_sketch
import SQuaReFuse``) and the baseline of ``scripts/benchmark_fusion.py`` (which loads it by file
path); build models with ``squarefuse.models.fusion.SQuaReFuse``.

Source: the original (Chinese) design document of the layer, ``fusion_square.py`` sketch.
Nothing is fixed here on purpose: it keeps the seed's in-place QR, its sorting of the
zero-filled padding and its ``T``-based sigma, so tests can check that a state dict saved
from it loads into ``squarefuse.models.fusion.SQuaReFuse`` and reproduces its outputs.
The only changes are translated comments. Its ``forward`` returns ``h`` alone, as the
seed does.
"""

# fusion_square.py
# SQuaRe-Fuse: Sliced-Quantile & Quadratic-trend Robust Fusion
# Drop-in sequence fusion layer: no Attention/SSM/Graph/low-rank kernel/ToMe

import torch
import torch.nn as nn


def _legendre_basis(T: int, order: int, device, dtype):
    # Discrete Legendre basis of order 0..order, t in [-1,1]
    t = torch.linspace(-1.0, 1.0, T, device=device, dtype=dtype)
    P = [torch.ones_like(t)]
    if order >= 1:
        P.append(t)
    for n in range(1, order):
        # Recurrence: (n+1)P_{n+1} = (2n+1)t P_n - n P_{n-1}
        P.append(((2 * n + 1) * t * P[n] - n * P[n - 1]) / (n + 1))
    B = torch.stack(P[: order + 1], dim=0)  # [ord+1, T]
    # L2 normalize rows
    B = B / (B.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-6).sqrt())
    return B  # [P+1, T]


def _soft_quantiles(sorted_vals: torch.Tensor, levels: torch.Tensor, sigma: float = 0.5):
    """
    Differentiable quantiles: Gaussian N(mu, sigma) weighted average over ranks of sorted s[i].
    sorted_vals: [..., T]
    levels: [Q] in (0,1)
    """
    *lead, T = sorted_vals.shape
    ranks = torch.arange(T, device=sorted_vals.device, dtype=sorted_vals.dtype)
    targets = levels * (T - 1)  # target ranks
    # weights w[q, i] = exp(-(i - targets[q])^2 / (2 sigma^2)) / Z
    diff = ranks[None, :] - targets[:, None]  # [Q, T]
    w = torch.exp(-0.5 * (diff / max(sigma, 1e-6)) ** 2)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-6)  # [Q, T]
    # matmul over the last dim: [..., T] x [T] -> [...,]
    # flatten sorted to [-1, T] then multiply by [Q, T]^T
    s_flat = sorted_vals.reshape(-1, T)  # [L, T]
    q = (w @ s_flat.T).T  # [L, Q]
    return q.reshape(*lead, -1)  # [..., Q]


class SQuaReFuse(nn.Module):
    """
    Sliced-Quantile & Quadratic-trend Robust Fusion
    Input : x:[B,T,N,D], valid_mask:[B,T,N] (optional)
    Output: h:[B,T,N,D], memory_dict (API aligned with RamaFuse)
    """

    def __init__(
        self,
        d_model: int,
        num_dirs: int = 8,  # K: number of projection directions
        quantiles: tuple[float, ...] = (0.1, 0.5, 0.9),
        poly_order: int = 2,  # 0..2 is usually enough
        beta_init: float = 0.5,
        ortho_every_forward: bool = True,
    ):
        super().__init__()
        self.d_model = d_model
        self.K = int(num_dirs)
        self.Q = torch.tensor(quantiles, dtype=torch.float32)
        self.P = int(poly_order)
        self.ortho_every_forward = ortho_every_forward

        # Projection matrix (learned), orthonormalised into U by QR
        self.proj = nn.Linear(d_model, self.K, bias=False)
        nn.init.kaiming_uniform_(self.proj.weight, a=5**0.5)

        # map the (K * |Q|) quantiles + (K*(P+1)) trend coefficients back to D
        feat_in = self.K * (len(quantiles) + (self.P + 1))
        self.head = nn.Sequential(
            nn.LayerNorm(feat_in),
            nn.Linear(feat_in, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
        )
        # residual scale
        self.beta = nn.Parameter(torch.tensor(beta_init, dtype=torch.float32))

        self._mem_state: dict[str, torch.Tensor] = {}

    def _orthonormalize(self):
        with torch.no_grad():
            W = self.proj.weight.data  # [K, D]
            # QR of the transpose gives Q^T -> directions (rows) orthonormal
            Q, _ = torch.linalg.qr(W.t(), mode="reduced")  # [D, K]
            self.proj.weight.data.copy_(Q.t())

    def forward(
        self,
        x: torch.Tensor,  # [B,T,N,D]
        valid_mask: torch.Tensor | None = None,  # [B,T,N]
    ):
        B, T, N, D = x.shape
        device, dtype = x.device, x.dtype
        if valid_mask is None:
            valid_mask = torch.ones(B, T, N, device=device, dtype=dtype)

        if self.ortho_every_forward:
            self._orthonormalize()

        # 1) project onto K directions: v = x · U  -> [B,T,N,K]
        U = self.proj.weight.t()  # [D,K]
        v = torch.einsum("btn d, dk -> btnk", x, U)  # [B,T,N,K]
        v = v * valid_mask[..., None]  # zero-fill the mask

        # 2) differentiable quantiles along time
        # sort: [B,N,K,T]
        s, _ = torch.sort(v.permute(0, 2, 3, 1).contiguous(), dim=-1)
        levels = self.Q.to(device=device, dtype=dtype)  # [Q]
        qv = _soft_quantiles(s, levels=levels, sigma=max(0.5, T / 16))  # [B,N,K*Q]
        qv = qv.view(B, N, self.K, -1)  # [B,N,K,Q]

        # 3) Legendre trend coefficients (0..P) on time
        Bmat = _legendre_basis(T, self.P, device, dtype)  # [P+1, T]
        # coefficients = <v_k(t), B_p(t)>, first turn v into [B,N,K,T]
        v_bnkt = v.permute(0, 2, 3, 1).contiguous()
        coeff = torch.einsum("bnkt, pt -> bnkp", v_bnkt, Bmat)  # [B,N,K,P+1]

        # concatenate into a token-level statistics vector, then map back to D
        feats = torch.cat([qv, coeff], dim=-1).reshape(B, N, -1)  # [B,N, K*(Q+P+1)]
        y = self.head(feats)  # [B,N,D]

        # broadcast back over time, residual fusion
        y_btnd = y[:, None, :, :].expand(B, T, N, D)
        h = x + self.beta * y_btnd
        h = valid_mask[..., None] * h + (1.0 - valid_mask[..., None]) * x

        return h
