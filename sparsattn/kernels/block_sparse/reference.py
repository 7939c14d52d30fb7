"""Reference: block-sparse attention in plain torch, obviously correct, differentiable by autograd.

Computes softmax attention restricted to a ``BlockPattern``'s element mask (see
``sparsattn.patterns``), in float32, one chunk of query blocks at a time so that memory stays
``O(chunk * kv_len)`` per head instead of quadratic. Rows with no key return zeros and a
log-sum-exp of ``-inf``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...patterns import BlockPattern


def _seq_slices(n_batch: int, T: int, lens: Optional[torch.Tensor], offsets: Optional[torch.Tensor]):
    out = []
    for b in range(n_batch):
        L = T if lens is None else int(lens[b])
        o = 0 if offsets is None else int(offsets[b])
        out.append((o, L))
    return out


def block_sparse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, *,
                           scale: Optional[float] = None, q_lens: Optional[torch.Tensor] = None,
                           kv_lens: Optional[torch.Tensor] = None, q_offsets: Optional[torch.Tensor] = None,
                           kv_offsets: Optional[torch.Tensor] = None, max_chunk_elems: int = 1 << 26,
                           softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None):
    """block_sparse_reference: attention of ``q [B, Hq, Tq, D]`` on ``k, v [B, Hkv, Tk, D(v)]``
    restricted to ``pattern``; returns ``(out [B, Hq, Tq, Dv] in q.dtype, lse [B, Hq, Tq] float32)``.

    ``softcap``: scores become ``softcap * tanh(s / softcap)`` after the scale, before the mask
    (Gemma 2). ``sinks``: float ``[Hq]``, one learned logit per query head that joins every row's
    softmax denominator without a value (gpt-oss); the lse then includes it (a row of a sequence
    with no key gets zeros and ``lse = sink``). Both are differentiable by autograd (sinks too).

    Sequence ``b`` occupies query tokens ``[q_offsets[b], q_offsets[b] + q_lens[b])`` and key tokens
    likewise (defaults: offset 0, full length); pattern block indices and causality are relative
    to the sequence's start and lengths. Outputs outside every sequence are zero (lse ``-inf``).
    Inputs are assumed validated by the caller (``sparsattn.attention``).
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, Tq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq, Tq), float("-inf"), dtype=torch.float32, device=q.device)
    per_batch: dict = {}  # b -> [(out chunk, lse chunk)] covering the sequence's rows in order
    sk = None if sinks is None else sinks.float().reshape(Hq, 1, 1)  # [Hq, 1, 1]
    qs = _seq_slices(B, Tq, q_lens, q_offsets)
    ks = _seq_slices(B, Tk, kv_lens, kv_offsets)
    bq = pattern.block_q
    for b in range(B):
        (qo, ql), (ko, kl) = qs[b], ks[b]
        if ql == 0:
            continue
        pb = b if pattern.batch > 1 else 0
        kb = k[b, :, ko:ko + kl].float()
        vb = v[b, :, ko:ko + kl].float()
        kb = kb.repeat_interleave(G, 0)
        vb = vb.repeat_interleave(G, 0)
        # small row chunks: only the key columns some row of the chunk uses are computed, which
        # keeps the cost proportional to the pattern for local/sparse patterns
        rows_per_chunk = min(max(bq, 256 // bq * bq),
                             max(bq, (max_chunk_elems // max(Hq * max(kl, 1), 1)) // bq * bq))
        n_qb = -(-ql // bq)
        step = rows_per_chunk // bq
        for qb0 in range(0, n_qb, step):
            qb1 = min(n_qb, qb0 + step)
            r0, r1 = qb0 * bq, min(ql, qb1 * bq)
            qc = q[b, :, qo + r0:qo + r1].float()
            mask = pattern.mask_rows(pb, qb0, qb1, ql, kl)  # [Hp, rows, kl]
            used = mask.any(1).any(0).nonzero().flatten()  # columns kept by any head and row
            if used.numel() == 0:  # no row of the chunk has a key (kl = 0, causal offsets, empty
                # pattern rows): zeros and lse = -inf, as documented (softmax of nothing)
                # (an empty contraction: exact zeros that stay connected to q and v for autograd)
                zero = torch.matmul(torch.matmul(qc, kb[:, :0].transpose(-1, -2)), vb[:, :0])
                empty_l = qc.new_full((Hq, r1 - r0), float("-inf")) if sk is None else sk[..., 0].expand(Hq, r1 - r0)
                per_batch.setdefault(b, []).append((zero, empty_l))
                continue
            if used.numel() < kl:  # drop columns masked everywhere in this chunk (changes nothing)
                mask = mask.index_select(2, used)
                kc, vc = kb.index_select(1, used), vb.index_select(1, used)
            else:
                kc, vc = kb, vb
            if mask.shape[0] != Hq:
                mask = mask.repeat_interleave(Hq // mask.shape[0], 0) if mask.shape[0] > 1 else mask.expand(Hq, -1, -1)
            s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~mask, float("-inf"))
            m = s.amax(-1, keepdim=True)
            if sk is not None:
                m = torch.maximum(m, sk)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = torch.exp(s - m)
            denom = p.sum(-1, keepdim=True)
            if sk is not None:
                denom = denom + torch.exp(sk - m)
            o = torch.matmul(p, vc) / torch.where(denom == 0, torch.ones_like(denom), denom)
            lc = torch.where(denom[..., 0] == 0, torch.full_like(denom[..., 0], float("-inf")),
                             torch.log(denom[..., 0]) + m[..., 0])
            per_batch.setdefault(b, []).append((o, lc))
    # one out-of-place write per sequence (keeps autograd flowing to q, k, v)
    for b, parts in per_batch.items():
        qo, ql = qs[b]
        ob = torch.cat([o for o, _ in parts], 1)
        lb = torch.cat([lc for _, lc in parts], 1)
        out = _write(out, ob, b, qo, qo + ql)
        lse = _write(lse, lb, b, qo, qo + ql)
    if not out.requires_grad and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # no row has a key (Tk = 0, all lengths 0...): the output is a constant 0, still differentiable
        # (zero gradients) like the Triton op; sums over empty slices add exactly 0, never NaN
        out = out + sum(t[..., :0].float().sum() for t in (q, k, v))
    return out.to(q.dtype), lse


def apply_softcap_sinks(s: torch.Tensor, keep: torch.Tensor, softcap: Optional[float],
                        sinks: Optional[torch.Tensor]):
    """apply_softcap_sinks: the shared softmax of the references on scores ``s [..., H, Tq, Tk]``.

    Caps ``s`` (``softcap * tanh(s / softcap)``), masks it with ``keep``, and returns
    ``(probabilities, lse)`` where the denominator includes ``exp(sinks[h])`` per head when
    ``sinks [H]`` is given (computed in ``s``'s dtype). Rows without a key and without a sink give
    probabilities 0 and ``lse = -inf``.
    """
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        sk = sinks.to(s.dtype).reshape(-1, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, sk], -1)
    lse = torch.logsumexp(s, -1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None])
    if sinks is not None:
        p = p[..., :-1]
    return p, lse


def _write(dst: torch.Tensor, src: torch.Tensor, b: int, a: int, z: int) -> torch.Tensor:
    """Out-of-place slice write that keeps autograd (dst[b, :, a:z] = src)."""
    idx = torch.arange(a, z, device=dst.device)
    row = dst[b].index_copy(1, idx, src)
    return dst.index_copy(0, torch.tensor([b], device=dst.device), row[None])


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, mask: Optional[torch.Tensor] = None,
                    softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None):
    """dense_reference: plain softmax attention in float64 (GQA by repetition), for tests.

    ``mask``: optional bool ``[B or 1, Hq or 1, Tq, Tk]``; causal aligns bottom-right. ``softcap`` /
    ``sinks [Hq]`` as in ``block_sparse_reference`` (differentiable, sinks in float64). Returns
    ``(out float64, lse float64)``; rows with no key give zeros and ``-inf`` (``lse = sink`` with sinks).
    """
    B, Hq, Tq, D = q.shape
    G = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    s = torch.matmul(q.double(), kk.transpose(-1, -2)) * scale
    keep = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if causal:
        Tk = k.shape[2]
        i = torch.arange(Tq, device=s.device)[:, None]
        j = torch.arange(Tk, device=s.device)[None, :]
        keep = keep & (j <= i + (Tk - Tq))
    if mask is not None:
        keep = keep & mask
    keep = keep.expand(s.shape)
    p, lse = apply_softcap_sinks(s, keep, softcap, None if sinks is None else sinks.double())
    p = torch.where(keep, p, torch.zeros_like(p))
    return torch.matmul(p, vv), lse
