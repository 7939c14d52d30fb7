"""Reference: sparse decode attention in plain torch (gather + softmax in float32).

Obviously-correct twin of ``triton.py``: for every (batch, query head) it gathers the selected
tokens (or pages) of the KV cache, computes softmax attention of the single query in float32 and
returns ``(out, lse)``. Rows that select no token give zeros and ``lse = -inf``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...patterns import TokenPattern


def paged_to_contiguous(pages: torch.Tensor, block_table: torch.Tensor, T: int) -> torch.Tensor:
    """paged_to_contiguous: ``pages [n_pages, Hkv, P, D]`` + ``block_table [B, max_pages]`` ->
    ``[B, Hkv, T, D]`` (token ``t`` of batch ``b`` is ``pages[block_table[b, t // P], :, t % P]``)."""
    n_pages, Hkv, P, D = pages.shape
    t = torch.arange(T, device=pages.device)
    pg = block_table[:, (t // P).clamp_max(block_table.shape[1] - 1)].long().clamp(0, n_pages - 1)  # [B, T]
    out = pages[pg, :, (t % P)[None, :].expand_as(pg)]  # [B, T, Hkv, D]
    return out.permute(0, 2, 1, 3)


def row_lens(kv_lens: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Valid length of each of ``n_rows`` pattern rows, int64 ``[B, n_rows]``, from per-sequence
    ``[B]`` or per-KV-head ``[B, Hkv]`` lengths (``n_rows`` a multiple of ``Hkv`` then)."""
    kl = kv_lens.long()
    if kl.dim() == 1:
        return kl[:, None].expand(-1, n_rows)
    H = kl.shape[1]
    if n_rows % H:
        raise ValueError(f"kv_lens: per-KV-head lengths [B, {H}] need pattern rows that are a multiple of {H}, "
                         f"got {n_rows}")
    return kl.repeat_interleave(n_rows // H, 1)


def selected_tokens(pattern: Optional[TokenPattern], kv_lens: torch.Tensor, T: int, n_rows: int,
                    log_weight: Optional[torch.Tensor] = None):
    """Token positions ``[B, n_rows, n]`` (int64), validity mask and per-token log-weights (or None).

    ``kv_lens``: ``[B]`` per sequence, or ``[B, Hkv]`` per KV head (then ``n_rows`` is a multiple of
    ``Hkv``: row ``r`` belongs to KV head ``r // (n_rows // Hkv)``). ``pattern=None`` selects every
    token below the row's length. Pattern rows are broadcast to ``n_rows`` heads when the pattern
    has a single head.
    """
    B = kv_lens.shape[0]
    dev = kv_lens.device
    lim = row_lens(kv_lens, n_rows)[..., None]  # [B, n_rows, 1]
    if pattern is None:
        tok = torch.arange(T, device=dev).expand(B, n_rows, T)
        valid = tok < lim
        return tok, valid, None
    P = pattern.page_size
    idx = pattern.indices.long()
    if pattern.batch == 1 and B > 1:
        idx = idx.expand(B, -1, -1)
    cnt = pattern.counts.expand(B, -1) if pattern.batch == 1 else pattern.counts
    if idx.shape[1] != n_rows:
        idx = idx.expand(-1, n_rows, -1)
        cnt = cnt.expand(-1, n_rows)
    max_n = idx.shape[-1]
    entry_ok = torch.arange(max_n, device=dev) < cnt[..., None].long()  # [B, R, max_n]
    off = torch.arange(P, device=dev)
    tok = (idx[..., None] * P + off).reshape(B, n_rows, max_n * P)
    valid = (entry_ok[..., None].expand(-1, -1, -1, P).reshape(B, n_rows, max_n * P)
             & (tok < lim))
    lw = None
    if log_weight is not None:
        w = log_weight.float()
        if w.shape[0] == 1 and B > 1:
            w = w.expand(B, -1, -1)
        if w.shape[1] != n_rows:
            w = w.expand(-1, n_rows, -1)
        lw = w[..., None].expand(-1, -1, -1, P).reshape(B, n_rows, max_n * P)
    return tok, valid, lw


def sparse_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            pattern: Optional[TokenPattern], *, scale: Optional[float] = None,
                            kv_lens: Optional[torch.Tensor] = None, log_weight: Optional[torch.Tensor] = None,
                            block_table: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                            sinks: Optional[torch.Tensor] = None):
    """sparse_decode_reference: decode attention of ``q [B, Hq, D]`` on the selected cache tokens.

    ``k_cache, v_cache``: ``[B, Hkv, T, D]``, or pages ``[n_pages, Hkv, P, D]`` with ``block_table``
    ``[B, max_pages]`` (then ``T = max_pages * P``). ``kv_lens``: ``[B]`` or per KV head ``[B, Hkv]``.
    ``log_weight`` ``[B, Hp, max_n]`` is added to
    the logit of each selected entry (natural log). ``softcap``: scores ``softcap * tanh(s / softcap)``
    (before the log-weights); ``sinks [Hq]``: learned sink logits in the denominator (and the lse).
    Returns ``(out [B, Hq, D] in q.dtype, lse [B, Hq] float32)``. Inputs are assumed validated by the caller.
    """
    B, Hq, D = q.shape
    if block_table is not None:
        T = block_table.shape[1] * k_cache.shape[2]
        k_cache = paged_to_contiguous(k_cache, block_table, T)
        v_cache = paged_to_contiguous(v_cache, block_table, T)
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if kv_lens is None:
        kv_lens = torch.full((B,), T, dtype=torch.int32, device=q.device)
    rows = 1 if pattern is None else pattern.heads
    if kv_lens.dim() == 2 and rows == 1:
        rows = Hkv  # per-KV-head lengths: a row per KV head
    tok, valid, lw = selected_tokens(pattern, kv_lens.to(q.device), T, rows, log_weight)
    if rows != Hq:  # a row per KV head (shared by its query group) or one row for all heads
        rep = Hq // rows
        tok, valid = tok.repeat_interleave(rep, 1), valid.repeat_interleave(rep, 1)
        lw = None if lw is None else lw.repeat_interleave(rep, 1)
    kk = k_cache.float().repeat_interleave(G, 1)  # [B, Hq, T, Dk]
    vv = v_cache.float().repeat_interleave(G, 1)
    t = tok.clamp(0, max(T - 1, 0))
    kg = torch.gather(kk, 2, t[..., None].expand(-1, -1, -1, kk.shape[-1]))  # [B, Hq, n, D]
    vg = torch.gather(vv, 2, t[..., None].expand(-1, -1, -1, vv.shape[-1]))
    s = torch.einsum("bhd,bhnd->bhn", q.float(), kg) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if lw is not None:
        s = s + lw
    s = s.masked_fill(~valid, float("-inf"))
    if sinks is not None:  # one more softmax term per head, with no value
        s_all = torch.cat([s, sinks.float()[None, :, None].expand(B, Hq, 1)], -1)
        lse = torch.logsumexp(s_all, -1)
    else:
        lse = torch.logsumexp(s, -1) if s.shape[-1] else torch.full((B, Hq), float("-inf"), device=q.device)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.where(valid, torch.exp(s - safe[..., None]), torch.zeros_like(s))
    out = torch.einsum("bhn,bhnd->bhd", p, vg)
    return out.to(q.dtype), lse.float()
