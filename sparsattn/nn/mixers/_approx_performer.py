"""Performer FAVOR+ positive random features (shared by the ``scatterbrain`` and ``sea`` mixers; their
linear attention is ``_approx_logfavor.log_linear_attention``, which works on ``favor_exponents``).

Rethinking Attention with Performers (arXiv 2009.14794): with ``x' = x * scale**0.5`` and ``m``
orthogonal random directions ``w_r``,

    phi(x) = exp(w_r . x' - |x'|^2 / 2) / sqrt(m),      E[phi(q) . phi(k)] = exp(scale * q . k).

For stability each feature vector is computed relative to a stabiliser ``c`` (per query row; one
per (batch, head) for the keys), so ``exp(scale q.k) ~= phi(q).phi(k) * exp(c_q + c_k)``: the true
log-normaliser is ``log(phi(q) . sum phi(k)) + c_q + c_k``. Unlike the Performer code no epsilon is
added to the features (the estimate stays unbiased; an empty normaliser gives lse = -inf).
"""
from __future__ import annotations

import torch

from ._approx_common import cdiv, wide_dtype


def orthogonal_features(m: int, d: int, seed: int) -> torch.Tensor:
    """``[m, d]`` random feature directions: blocks of ``d`` orthogonal rows (QR of a Gaussian
    matrix), each row rescaled to the norm of an independent Gaussian vector (Performer's ORF with
    ``scaling=0``). Drawn from a CPU generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    blocks = []
    for _ in range(cdiv(m, d)):
        qm, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        blocks.append(qm.T)
    w = torch.cat(blocks, 0)[:m]
    norms = torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).float()


def favor_exponents(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """``[..., T, m]``: the exponents ``w_r . x' - |x'|^2 / 2`` (``x' = x * scale**0.5``) of the FAVOR+
    features of ``x [..., T, D]`` under directions ``w [m, D]``, in ``wide_dtype`` (so
    ``phi(x)_r = exp(exponent_r) / sqrt(m)`` before any stabiliser)."""
    dt = wide_dtype(x)
    xs = x.to(dt) * scale ** 0.5
    return torch.matmul(xs, w.to(dt).T) - 0.5 * (xs * xs).sum(-1, keepdim=True)


def favor_features(x: torch.Tensor, w: torch.Tensor, scale: float, *, is_query: bool):
    """``(phi [..., T, m], c)``: FAVOR+ features of ``x [..., T, D]`` under directions ``w [m, D]`` and
    their log-stabiliser ``c`` (``[..., T]`` for queries, ``[...]`` for keys: one per leading index):
    Performer's single-stabiliser form, the plain reference the Scatterbrain tests check the log-scale
    sums against (the mixers use ``favor_exponents``)."""
    base = favor_exponents(x, w, scale)
    if is_query:
        c = base.amax(-1, keepdim=True).detach()
    else:
        c = base.amax(dim=(-1, -2), keepdim=True).detach()
    phi = torch.exp(base - c) * w.shape[0] ** -0.5
    return phi, (c[..., 0] if is_query else c[..., 0, 0])
