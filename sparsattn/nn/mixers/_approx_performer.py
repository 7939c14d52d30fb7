"""Performer FAVOR+ positive random features and (causal) linear attention with a log-scale
normaliser (shared by the ``scatterbrain`` and ``sea`` mixers).

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

from ._approx_common import cdiv, pad_tokens, wide_dtype


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
    their log-stabiliser ``c`` (``[..., T]`` for queries, ``[...]`` for keys: one per leading index)."""
    base = favor_exponents(x, w, scale)
    if is_query:
        c = base.amax(-1, keepdim=True).detach()
    else:
        c = base.amax(dim=(-1, -2), keepdim=True).detach()
    phi = torch.exp(base - c) * w.shape[0] ** -0.5
    return phi, (c[..., 0] if is_query else c[..., 0, 0])


def linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, *, causal: bool, chunk: int = 64):
    """Unnormalised linear attention: ``num_i = sum_j phi_q(i).phi_k(j) v_j`` and
    ``den_i = sum_j phi_q(i).phi_k(j)`` over all j (or ``j <= i`` when ``causal``), for
    ``fq [..., Tq, m]``, ``fk [..., Tk, m]``, ``v [..., Tk, Dv]``. Causal: chunks of ``chunk`` tokens,
    exact masked products inside a chunk, a prefix sum of chunk states across chunks (no loop over
    tokens; memory ``O(T/chunk * m * Dv)``). Returns ``(num [..., Tq, Dv], den [..., Tq])``."""
    if not causal:
        kv = torch.matmul(fk.transpose(-1, -2), v)
        return torch.matmul(fq, kv), torch.matmul(fq, fk.sum(-2)[..., None])[..., 0]
    lead, T, m = fq.shape[:-2], fq.shape[-2], fq.shape[-1]
    n = cdiv(T, chunk)
    Tp = n * chunk
    q_c = pad_tokens(fq, Tp).reshape(*lead, n, chunk, m)
    k_c = pad_tokens(fk, Tp).reshape(*lead, n, chunk, m)
    v_c = pad_tokens(v, Tp).reshape(*lead, n, chunk, v.shape[-1])
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    a = torch.matmul(q_c, k_c.transpose(-1, -2)).masked_fill(~tri, 0.0)  # [..., n, c, c]
    num = torch.matmul(a, v_c)
    den = a.sum(-1)
    kv = torch.matmul(k_c.transpose(-1, -2), v_c)  # [..., n, m, Dv] per-chunk states
    ks = k_c.sum(-2)  # [..., n, m]
    kv_prev = torch.cumsum(kv, dim=-3) - kv  # exclusive prefix over chunks
    ks_prev = torch.cumsum(ks, dim=-2) - ks
    num = num + torch.matmul(q_c, kv_prev)
    den = den + torch.matmul(q_c, ks_prev[..., None])[..., 0]
    return num.reshape(*lead, Tp, -1)[..., :T, :], den.reshape(*lead, Tp)[..., :T]
