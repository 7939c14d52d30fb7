"""Angular LSH with Gray-code bucket order and attention inside sorted buckets (shared by the
``hyper`` and ``scatterbrain`` mixers).

``lsh_rank(x, proj)``: the signs of ``r`` random projections form an ``r``-bit code; buckets are
ordered by the code's rank in the reflected Gray sequence, so that neighbouring buckets differ in
one bit (nearby directions land near each other after a sort). ``sorted_block_attention`` runs
exact attention of the i-th block of sorted queries on the i-th block of sorted keys.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._approx_common import NEG_INF, cdiv, pad_tokens, softmax_lse, wide_dtype


def lsh_projections(dim: int, n_projs: int, seed: int, device=None) -> torch.Tensor:
    """``[dim, n_projs]`` standard normal hyperplanes drawn from a CPU generator seeded with ``seed``
    (the same on every device)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(dim, n_projs, generator=g).to(device)


def gray_rank(code: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Position of each integer ``code`` in the ``n_bits`` reflected Gray sequence (inverse Gray
    code: prefix XOR of the bits), so consecutive ranks differ by one bit of ``code``."""
    r = code.clone()
    shift = 1
    while shift < n_bits:
        r = r ^ (r >> shift)
        shift <<= 1
    return r


def lsh_rank(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Bucket rank (int64 ``[..., T]``) of the rows of ``x [..., T, D]`` under hyperplanes
    ``proj [D, r]``: sign bits -> code -> Gray-sequence rank."""
    r = proj.shape[1]
    bits = (torch.matmul(x.float(), proj.float()) > 0).long()
    code = (bits << torch.arange(r, device=x.device)).sum(-1)
    return gray_rank(code, r)


def sort_by_rank(rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, inverse)``: a stable sort of ``rank [..., T]`` and its inverse permutation."""
    order = torch.sort(rank, dim=-1, stable=True).indices
    inv = torch.empty_like(order)
    inv.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return order, inv


def sorted_block_attention(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, n_blocks: int, *, scale: float,
                           q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None,
                           return_scores: bool = False):
    """Exact attention of the i-th of ``n_blocks`` equal blocks of sorted queries ``qs [..., nq, D]``
    on the i-th block of sorted keys ``ks, vs [..., nk, D]``.

    Queries are cut into blocks of ``ceil(nq / n_blocks)`` rows and keys of ``ceil(nk / n_blocks)``
    (padding rows/keys at the end are masked, never attended). With ``q_pos``/``k_pos`` (original
    token positions ``[..., nq]`` / ``[..., nk]``) a pair is kept only when ``k_pos <= q_pos``
    (causal). Returns ``(out [..., nq, Dv], lse [..., nq])`` in float32 (float64 for float64 inputs) and, with
    ``return_scores``, the keep mask ``[..., n_blocks, bq, bk]``.
    """
    lead = qs.shape[:-2]
    nq, nk = qs.shape[-2], ks.shape[-2]
    bq, bk = cdiv(nq, n_blocks), cdiv(nk, n_blocks)
    w = wide_dtype(qs)
    qp = pad_tokens(qs.to(w), bq * n_blocks).reshape(*lead, n_blocks, bq, qs.shape[-1])
    kp = pad_tokens(ks.to(w), bk * n_blocks).reshape(*lead, n_blocks, bk, ks.shape[-1])
    vp = pad_tokens(vs.to(w), bk * n_blocks).reshape(*lead, n_blocks, bk, vs.shape[-1])
    k_ok = (torch.arange(bk * n_blocks, device=qs.device) < nk).reshape(n_blocks, 1, bk)
    keep = k_ok.expand(n_blocks, bq, bk)
    if q_pos is not None:
        big = torch.iinfo(torch.int64).max
        qpp = torch.nn.functional.pad(q_pos, (0, bq * n_blocks - nq), value=-1).reshape(*lead, n_blocks, bq)
        kpp = torch.nn.functional.pad(k_pos, (0, bk * n_blocks - nk), value=big).reshape(*lead, n_blocks, bk)
        keep = keep & (kpp[..., None, :] <= qpp[..., :, None])
    s = torch.matmul(qp, kp.transpose(-1, -2)) * scale
    out, lse = softmax_lse(s, vp, keep)
    out = out.reshape(*lead, bq * n_blocks, vs.shape[-1])[..., :nq, :]
    lse = lse.reshape(*lead, bq * n_blocks)[..., :nq]
    if return_scores:
        return out, lse, keep
    return out, lse


__all__ = ["lsh_projections", "gray_rank", "lsh_rank", "sort_by_rank", "sorted_block_attention", "window_attention", "NEG_INF"]


def window_attention(q: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, start: torch.Tensor, width: int, *,
                     scale: float, same: Optional[tuple] = None):
    """Exact attention of every query row ``i`` of ``q [..., nq, D]`` on the ``width`` sorted keys
    ``ks, vs [..., nk, D]`` at positions ``[start_i, start_i + width)`` (positions outside
    ``[0, nk)`` are masked). ``same = (q_rank [..., nq], ks_rank [..., nk])`` keeps only the keys of
    the query's own bucket. Returns ``(out [..., nq, Dv], lse [..., nq], idx [..., nq, width],
    keep [..., nq, width])`` (idx clamped into range; keep marks the pairs computed). Rows are
    processed in chunks of at most ``2**24`` gathered key elements (bounded memory)."""
    nq = q.shape[-2]
    per_row = math.prod(q.shape[:-2]) * width * ks.shape[-1]
    step = max(1, (1 << 24) // max(per_row, 1))
    if nq > step:
        res = [window_attention(q[..., a:a + step, :], ks, vs, start[..., a:a + step], width, scale=scale,
                                same=None if same is None else (same[0][..., a:a + step], same[1]))
               for a in range(0, nq, step)]
        return tuple(torch.cat([r[i] for r in res], dim=q.dim() - 2) for i in range(4))
    nk = ks.shape[-2]
    w = wide_dtype(q)
    idx = start[..., None] + torch.arange(width, device=q.device)
    keep = (idx >= 0) & (idx < nk)
    idx = idx.clamp(0, max(nk - 1, 0))
    flat = idx.reshape(*idx.shape[:-2], -1)
    kg = ks.to(w).gather(-2, flat[..., None].expand(*flat.shape, ks.shape[-1])).reshape(*idx.shape, ks.shape[-1])
    vg = vs.to(w).gather(-2, flat[..., None].expand(*flat.shape, vs.shape[-1])).reshape(*idx.shape, vs.shape[-1])
    if same is not None:
        q_rank, k_rank = same
        keep = keep & (k_rank.gather(-1, flat).reshape(idx.shape) == q_rank[..., None])
    s = torch.einsum("...id,...iwd->...iw", q.to(w), kg) * scale
    out, lse = softmax_lse(s[..., None, :], vg, keep[..., None, :])
    return out[..., 0, :], lse[..., 0], idx, keep
