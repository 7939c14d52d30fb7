"""Estimate reference: plain torch implementations of the cheap scoring helpers (see ``__init__``)."""
from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check_qk(q: Tensor, k: Tensor) -> tuple[int, int, int, int, int, int]:
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise _err("q", "a 4-D tensor [B, Hq, Tq, D]", getattr(q, "shape", type(q)))
    if not isinstance(k, Tensor) or k.dim() != 4:
        raise _err("k", "a 4-D tensor [B, Hkv, Tk, D]", getattr(k, "shape", type(k)))
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise _err("k", f"batch {B} and head_dim {D} (as q)", tuple(k.shape))
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise _err("k heads", f"a divisor of q's {Hq} heads", Hkv)
    return B, Hq, Hkv, Tq, k.shape[2], D


def group_query_heads(q: Tensor, kv_heads: int) -> Tensor:
    """group_query_heads: ``q [B, Hq, T, D]`` viewed as ``[B, Hkv, G, T, D]`` (GQA groups, no copy)."""
    B, Hq, T, D = q.shape
    if kv_heads < 1 or Hq % kv_heads:
        raise _err("kv_heads", f"a divisor of {Hq}", kv_heads)
    return q.view(B, kv_heads, Hq // kv_heads, T, D)


def _scores_gqa(q: Tensor, k: Tensor) -> Tensor:
    """q [B,Hq,M,D] x k [B,Hkv,N,D] -> float32 [B,Hq,M,N] without repeating k."""
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    qg = group_query_heads(q.float(), Hkv)
    s = torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2))
    return s.reshape(B, Hq, M, k.shape[2])


def pool_blocks(x: Tensor, block: int, mode: str = "mean") -> Tensor:
    """pool_blocks: pool ``x [B, H, T, D]`` over blocks of ``block`` tokens -> float32 ``[B, H, ceil(T/block), D]``.

    ``mode``: ``"mean"`` (the ragged last block is averaged over its valid tokens) or ``"max"``.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise _err("x", "a 4-D tensor [B, H, T, D]", getattr(x, "shape", type(x)))
    if not isinstance(block, int) or block < 1:
        raise _err("block", "an int >= 1", block)
    if mode not in ("mean", "max"):
        raise _err("mode", "'mean' or 'max'", repr(mode))
    B, H, T, D = x.shape
    nfull, tail = divmod(T, block)
    # reduce in place of the input (float32 accumulation for the mean, exact max in x's dtype):
    # no float32 copy or padded copy of x (at 128K x 32 heads that copy alone is 2 GB)
    parts = []
    if nfull:
        xv = x[:, :, : nfull * block].reshape(B, H, nfull, block, D)
        parts.append(xv.sum(3, dtype=torch.float32) / block if mode == "mean" else xv.amax(3).float())
    if tail:
        xt = x[:, :, nfull * block:]
        parts.append((xt.sum(2, keepdim=True, dtype=torch.float32) / tail) if mode == "mean"
                     else xt.amax(2, keepdim=True).float())
    if not parts:
        return torch.zeros(B, H, 0, D, dtype=torch.float32, device=x.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def causal_block_mask(q_len: int, kv_len: int, block_q: int, block_k: int, device=None) -> Tensor:
    """causal_block_mask: bool ``[nq, nk]``, True where the block holds at least one causal pair
    (``j <= i + kv_len - q_len``, bottom-right aligned)."""
    nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    r1 = torch.clamp((torch.arange(nq, device=device) + 1) * block_q, max=q_len) - 1
    c0 = torch.arange(nk, device=device) * block_k
    return c0[None, :] <= r1[:, None] + (kv_len - q_len)


def diagonal_block(q_len: int, kv_len: int, block_q: int, block_k: int, device=None) -> Tensor:
    """Key block holding the diagonal of the last row of each query block: long ``[nq]``."""
    nq = _cdiv(q_len, block_q)
    r1 = torch.clamp((torch.arange(nq, device=device) + 1) * block_q, max=q_len) - 1
    return torch.clamp((r1 + (kv_len - q_len)) // block_k, min=0)


def block_scores(q: Tensor, k: Tensor, block_q: int, block_k: Optional[int] = None, *, scale: Optional[float] = None,
                 causal: bool = True, pool: str = "mean") -> Tensor:
    """block_scores: pooled block attention logits ``scale * q̄ k̄ᵀ`` -> float32 ``[B, Hq, nq, nk]``.

    q and k are pooled over ``block_q`` / ``block_k`` tokens (``pool`` = "mean" or "max"); with
    ``causal`` blocks entirely above the diagonal get ``-inf``. Memory ``O((N/block)^2)`` per head.
    """
    B, Hq, Hkv, Tq, Tk, D = _check_qk(q, k)
    block_k = block_q if block_k is None else block_k
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qp = pool_blocks(q, block_q, pool)
    kp = pool_blocks(k, block_k, pool)
    s = _scores_gqa(qp, kp) * scale
    if causal:
        s = s.masked_fill(~causal_block_mask(Tq, Tk, block_q, block_k, q.device), float("-inf"))
    return s


def last_q_attention(q: Tensor, k: Tensor, last_q: int = 64, *, scale: Optional[float] = None,
                     causal: bool = True) -> Tensor:
    """last_q_attention: softmax attention of the last ``last_q`` queries on every key ->
    float32 ``[B, Hq, min(last_q, Tq), Tk]`` (causal, bottom-right aligned). O(last_q·N) memory."""
    B, Hq, Hkv, Tq, Tk, D = _check_qk(q, k)
    if not isinstance(last_q, int) or last_q < 1:
        raise _err("last_q", "an int >= 1", last_q)
    lq = min(last_q, Tq)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = _scores_gqa(q[:, :, Tq - lq:], k) * scale
    if causal:
        rows = torch.arange(Tq - lq, Tq, device=q.device) + (Tk - Tq)
        s = s.masked_fill(torch.arange(Tk, device=q.device)[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0)


def vertical_slash_scores(q: Tensor, k: Tensor, last_q: int = 64, *, scale: Optional[float] = None,
                          probs: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """vertical_slash_scores: MInference's estimate from the last ``last_q`` queries.

    Returns ``(vertical [B, Hq, Tk], slash [B, Hq, Tk])`` float32: ``vertical[j]`` = sum over the
    last queries of their attention to key ``j``; ``slash[d]`` = sum over the last queries ``i`` of
    their attention to key ``j = i + (Tk - Tq) - d`` (diagonal offset ``d >= 0``). ``probs`` may
    pass a precomputed ``last_q_attention``. Without ``probs`` one GQA group is processed at a
    time, so the peak extra memory is ``B · (Hq / Hkv) · last_q · Tk`` floats.
    """
    B, Hq, Hkv, Tq, Tk, D = _check_qk(q, k)
    if probs is not None:
        return probs.sum(2), _slash_sums(probs, Tq, Tk)
    G = Hq // Hkv
    vertical = torch.empty(B, Hq, Tk, dtype=torch.float32, device=q.device)
    slash = torch.empty(B, Hq, Tk, dtype=torch.float32, device=q.device)
    for h in range(Hkv):
        a = last_q_attention(q[:, h * G:(h + 1) * G], k[:, h:h + 1], last_q, scale=scale)
        vertical[:, h * G:(h + 1) * G] = a.sum(2)
        slash[:, h * G:(h + 1) * G] = _slash_sums(a, Tq, Tk)
    return vertical, slash


def _slash_sums(a: Tensor, Tq: int, Tk: int) -> Tensor:
    """Diagonal sums of the last-query attention ``a [B, H, lq, Tk]`` -> ``[B, H, Tk]`` (offset d).

    Row ``r`` (key index of its diagonal ``p = Tk - lq + r``) adds ``a[r, p - d]`` to offset ``d``.
    Reversed along keys, that is ``flip(a)[r, (lq - 1 - r) + d]``: a skewed view of the padded
    reversed rows, summed over ``r`` in one reduction (no loop over rows)."""
    B, H, lq, n = a.shape
    if lq == 0 or n == 0:
        return torch.zeros(B, H, Tk, dtype=torch.float32, device=a.device)
    if Tk - lq < 0:
        raise ValueError(f"a: expected at most Tk={Tk} rows, got {lq}")
    f = torch.nn.functional.pad(a.float().flip(-1), (0, lq)).contiguous()  # [B, H, lq, Tk + lq]
    W = Tk + lq
    skew = f.as_strided((B, H, lq, Tk), (H * lq * W, lq * W, W - 1, 1), f.storage_offset() + lq - 1)
    return skew.sum(2)


def exact_block_scores(q: Tensor, k: Tensor, block_q: int, block_k: Optional[int] = None, *,
                       scale: Optional[float] = None, causal: bool = True, reduce: str = "max",
                       max_chunk_elems: int = 1 << 24) -> Tensor:
    """exact_block_scores: block-max or block-sum of the exact softmax attention probabilities ->
    float32 ``[B, Hq, nq, nk]`` (blocks without a causal pair get ``-inf``).

    Computed one chunk of query blocks at a time so memory is ``O(chunk_rows · Tk)`` per head
    (``max_chunk_elems`` bounds ``B·Hq·chunk_rows·Tk``). ``reduce``: "max" or "sum" ("sum" divided
    by the block's number of query rows, i.e. the mean attention mass of the block per row).
    """
    B, Hq, Hkv, Tq, Tk, D = _check_qk(q, k)
    block_k = block_q if block_k is None else block_k
    if reduce not in ("max", "sum"):
        raise _err("reduce", "'max' or 'sum'", repr(reduce))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    nq, nk = _cdiv(Tq, block_q), _cdiv(Tk, block_k)
    out = torch.empty(B, Hq, nq, nk, dtype=torch.float32, device=q.device)
    step = max(1, max_chunk_elems // max(1, B * Hq * block_q * Tk))
    jk = torch.arange(Tk, device=q.device)
    for qb0 in range(0, nq, step):
        qb1 = min(nq, qb0 + step)
        r0, r1 = qb0 * block_q, min(Tq, qb1 * block_q)
        s = _scores_gqa(q[:, :, r0:r1], k) * scale
        if causal:
            rows = torch.arange(r0, r1, device=q.device) + (Tk - Tq)
            s = s.masked_fill(jk[None, :] > rows[:, None], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        n_rows = (qb1 - qb0) * block_q
        p = torch.nn.functional.pad(p, (0, nk * block_k - Tk, 0, n_rows - (r1 - r0)))
        p = p.view(B, Hq, qb1 - qb0, block_q, nk, block_k)
        if reduce == "max":
            out[:, :, qb0:qb1] = p.amax((3, 5))
        else:
            rows_in = torch.clamp(Tq - torch.arange(qb0, qb1, device=q.device) * block_q, max=block_q).float()
            out[:, :, qb0:qb1] = p.sum((3, 5)) / rows_in[:, None]
    if causal:
        out = out.masked_fill(~causal_block_mask(Tq, Tk, block_q, block_k, q.device), float("-inf"))
    return out


def topk_indices(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """topk_indices: indices of the ``k`` largest entries along the last dim (``k`` clamped to the
    size) and a validity mask that is False for ``-inf`` picks: ``(long [..., k'], bool [..., k'])``."""
    if not isinstance(k, int) or k < 0:
        raise _err("k", "an int >= 0", k)
    kk = min(k, scores.shape[-1])
    val, idx = torch.topk(scores, kk, dim=-1)
    return idx, val > float("-inf")


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """topk_mask: bool mask of the ``k`` largest finite entries along the last dim."""
    idx, ok = topk_indices(scores, k)
    m = torch.zeros(*scores.shape[:-1], scores.shape[-1] + 1, dtype=torch.bool, device=scores.device)
    m.scatter_(-1, torch.where(ok, idx, torch.full_like(idx, scores.shape[-1])), True)
    return m[..., :-1]
