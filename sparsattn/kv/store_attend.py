"""store_attend: decode attention on a ``HeadGroupStore`` (one group, or once per head group).

``attend_one``: the single-tensor layout (per-head lengths and compensation log-weights honoured, a
slot-indexed TokenPattern optional); ``attend_groups``: the sparse decode kernel once per head group on
that group's query heads (exact: a query head only reads its own KV head). Selected slots past a row's
own length hold nothing and are skipped on both paths.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.sparse_decode import sparse_decode_attention
from ..patterns import TokenPattern
from ..patterns._util import _err  # the library's one error-message helper
from .groups import group_query_heads

Tensor = torch.Tensor


def attend_one(st, q: Tensor, pattern: Optional[TokenPattern], kw: dict):
    """Decode attention of ``q [B, Hq, D]`` on a one-group store ``st`` (see the module docstring)."""
    g = st.groups[0]
    k, v = g.k, g.v
    T = k.shape[2]
    lens = st.lengths
    kl = st.kv_lens()
    lw_all = g.log_weight
    uniform = bool((lens == lens[:, :1]).all())
    if pattern is None:
        if lw_all is None:  # every kept slot: dense over each row's own length, no index list
            return sparse_decode_attention(q, k, v, None, kv_lens=kl if uniform else lens.to(torch.int32), **kw)
        idx = torch.arange(max(T, 1), device=k.device, dtype=torch.int32).expand(st.batch, st.kv_heads, -1)
        pattern = TokenPattern(idx.contiguous(), lens.to(torch.int32), T)
    if pattern.kv_len != T:
        raise _err("pattern.kv_len", f"{T} (the cache's slot count)", pattern.kv_len)
    if not uniform:
        # per-head lengths in one tensor: selected slots past a head's own length are skipped: checked
        # against the sequence's longest row, then the kernel bounds each KV head by its own length
        if kw.get("validate", True):
            from ..kernels.sparse_decode import _deep_check

            _deep_check(pattern, kl.to(pattern.device))
        kl = lens.to(torch.int32)
        kw = dict(kw, validate=False)
    lw = None
    if lw_all is not None:
        if pattern.page_size != 1:
            raise _err("pattern.page_size", "1 for a layer with compensation tokens", pattern.page_size)
        if pattern.heads != st.kv_heads or pattern.batch != st.batch:  # weights differ per (b, head)
            pattern = TokenPattern(pattern.indices.expand(st.batch, st.kv_heads, -1).contiguous(),
                                   pattern.counts.expand(st.batch, st.kv_heads).contiguous(), T)
        lw = torch.gather(lw_all, 2, pattern.indices.long().clamp_max(max(T - 1, 0)))
    return sparse_decode_attention(q, k, v, pattern, kv_lens=kl, log_weight=lw, **kw)


def _selected(st, pattern: TokenPattern, Hq: int, kw: dict, dev):
    """Token rows and validity ``[B, R, n]`` of a slot-indexed pattern, checked against the store."""
    from ..kernels.sparse_decode import _deep_check
    from ..kernels.sparse_decode.reference import selected_tokens

    B, H, T = st.batch, st.kv_heads, st.slots()
    if not isinstance(pattern, TokenPattern):
        raise _err("pattern", "a sparsattn.patterns.TokenPattern or None", type(pattern).__name__)
    if pattern.kv_len != T:
        raise _err("pattern.kv_len", f"{T} (the cache's slot count)", pattern.kv_len)
    if pattern.batch not in (1, B):
        raise _err("pattern batch", f"1 or {B}", pattern.batch)
    if pattern.heads not in (1, H, Hq):
        raise _err("pattern heads", f"1, {H} (kv heads) or {Hq} (query heads)", pattern.heads)
    kl = st.kv_lens().to(pattern.device)
    if kw.get("validate", True):
        _deep_check(pattern, kl)
    tok, valid, _ = selected_tokens(pattern, kl, T, pattern.heads)
    return tok.to(dev), valid.to(dev)


def attend_groups(st, q: Tensor, pattern: Optional[TokenPattern], kw: dict):
    """Decode attention of ``q [B, Hq, D]`` on a store of several head groups: one kernel call per group."""
    B, H = st.batch, st.kv_heads
    if isinstance(q, Tensor) and q.dim() == 4 and q.shape[2] == 1:
        q = q[:, :, 0]
    if not isinstance(q, Tensor) or q.dim() != 3 or q.shape[0] != B or q.shape[1] % H or q.shape[1] == 0:
        raise _err("q", f"a tensor [B={B}, Hq (a multiple of {H}), D]", getattr(q, "shape", type(q).__name__))
    Hq, G = q.shape[1], q.shape[1] // H
    dev = q.device
    tok = valid = None
    if pattern is not None:
        tok, valid = _selected(st, pattern, Hq, kw, dev)
    out = torch.zeros(B, Hq, q.shape[2], dtype=q.dtype, device=dev)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float32, device=dev)
    for g in st.groups:
        hs = g.heads.to(dev)
        qi = group_query_heads(hs, G, dev)
        ln = st.lengths[:, hs].to(dev)  # [B, H_g]
        cap = g.cap
        if pattern is None and g.log_weight is None:  # every kept slot: dense over each row's length
            o, s = sparse_decode_attention(q[:, qi], g.k, g.v, None, kv_lens=ln.to(torch.int32),
                                           **dict(kw, return_lse=True))
            out[:, qi], lse[:, qi] = o, s
            continue
        if pattern is None:
            t = torch.arange(max(cap, 1), device=dev).expand(B, hs.numel(), -1)
            ok = t < ln[..., None]
        else:
            R = tok.shape[1]
            rows = hs if R == H else (qi if R == Hq else torch.zeros(hs.numel(), dtype=torch.long, device=dev))
            lim = ln if R != Hq else st.lengths[:, qi // G].to(dev)
            t, ok = tok[:, rows], valid[:, rows]
            ok = ok & (t < lim[..., None])  # a slot past its row's length holds nothing: skipped
            order = torch.sort((~ok).to(torch.int8), dim=-1, stable=True).indices  # selected first, in order
            t, ok = torch.gather(t, 2, order), torch.gather(ok, 2, order)
            n = max(int(ok.sum(-1).max()) if ok.numel() else 0, 1)
            t, ok = t[..., :n], ok[..., :n]
            if t.shape[-1] < n:  # empty selection
                t = torch.zeros(*t.shape[:2], n, dtype=torch.long, device=dev)
                ok = torch.zeros(t.shape, dtype=torch.bool, device=dev)
        t = torch.where(ok, t, torch.zeros_like(t))
        pat = TokenPattern(t.to(torch.int32).contiguous(), ok.sum(-1).to(torch.int32).contiguous(), cap)
        lw = None
        if g.log_weight is not None and cap:
            lw = torch.gather(g.log_weight.to(dev), 2, t.clamp_max(cap - 1))
        o, s = sparse_decode_attention(q[:, qi], g.k, g.v, pat, kv_lens=ln.amax(1).to(torch.int32),
                                       log_weight=lw, **dict(kw, return_lse=True))
        out[:, qi], lse[:, qi] = o, s
    return (out, lse) if kw.get("return_lse") else out




def attend_rows(q: Tensor, k: Tensor, v: Tensor, lens: Tensor, lw: Optional[Tensor], *, scale=None, backend=None,
                dense_dtype=None, pad: Optional[Tensor] = None) -> Tensor:
    """attend_rows: causal attention of ``q [B, Hq, Tq, D]`` on rows ``k, v [B, H, T, D]`` whose valid slots are
    ``[pad, pad + lens)`` (``pad [B, H]``, default 0: slot-major rows; ``pad = T - lens``: left-padded rows),
    with optional per-slot log-weights ``lw [B, H, T]``; the Tq queries are the last Tq valid slots of each
    row. One query: ``sparse_decode_attention`` over the valid slots (``backend`` "triton"/"reference",
    else automatic); several: dense SDPA with an additive mask in ``dense_dtype`` (default ``q.dtype``;
    float32 is needed for log-weights)."""
    B, Hq, Tq, D = q.shape
    H, T = k.shape[1], k.shape[2]
    dev = k.device
    lens = lens.to(dev).long()
    start = torch.zeros_like(lens) if pad is None else pad.to(dev).long()
    if Tq == 1:
        idx = (start[..., None] + torch.arange(T, device=dev)).clamp(max=max(T - 1, 0))
        tp = TokenPattern(idx.to(torch.int32).contiguous(), lens.to(torch.int32).contiguous(), T)
        lws = None if lw is None else torch.gather(lw.to(dev), 2, idx)
        be = backend if backend in ("triton", "reference") else None
        return sparse_decode_attention(q[:, :, 0], k, v, tp, scale=scale, log_weight=lws, backend=be)[:, :, None]
    j = torch.arange(T, device=dev)
    end = (start + lens)[:, :, None, None]  # [B, H, 1, 1]
    i = torch.arange(Tq, device=dev)[:, None]
    keep = (j >= start[:, :, None, None]) & (j < end) & (j <= end - Tq + i)  # [B, H, Tq, T]
    w = torch.zeros((), device=dev) if lw is None else lw.to(dev).float()[:, :, None, :]
    bias = torch.where(keep, w, torch.full((), float("-inf"), device=dev))
    g = Hq // H
    dt = q.dtype if dense_dtype is None else dense_dtype
    bias = bias.repeat_interleave(g, 1).to(dt)
    kk, vv = (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)) if g > 1 else (k, v)
    out = F.scaled_dot_product_attention(q.to(dt), kk.to(dt), vv.to(dt), attn_mask=bias, scale=scale)
    return out.to(q.dtype)


__all__ = ["attend_one", "attend_groups", "attend_rows"]
