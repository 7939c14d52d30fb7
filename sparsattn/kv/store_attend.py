"""store_attend: decode attention on a ``HeadGroupStore`` (one group, or once per head group).

``attend_one``: the single-tensor layout (per-head lengths and compensation log-weights honoured, a
slot-indexed TokenPattern optional); ``attend_groups``: the sparse decode kernel once per head group on
that group's query heads (exact: a query head only reads its own KV head). Selected slots past a row's
own length hold nothing and are skipped on both paths. ``attend_rows``: several causal queries on rows
of per-head lengths (one query: the decode kernel).

Every path takes ``softcap`` (Gemma 2's logit soft-capping, applied to the scaled score before the
log-weight and the mask) and ``sinks`` (gpt-oss's learned sink logits, float ``[Hq]``, one per query
head of ``q``: a softmax term with no value), with the semantics of the kernels
(``sparsattn.kernels.sparse_decode.sparse_decode_attention``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels._checks import check_sinks, check_softcap
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
    kw = dict(kw)
    sinks = check_sinks(kw.pop("sinks", None), Hq, dev, values=False)  # values: checked by the kernel
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
        sk = None if sinks is None else sinks[qi]  # the sinks of this group's query heads
        if pattern is None and g.log_weight is None:  # every kept slot: dense over each row's length
            o, s = sparse_decode_attention(q[:, qi], g.k, g.v, None, kv_lens=ln.to(torch.int32),
                                           **dict(kw, return_lse=True, sinks=sk))
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
                                       log_weight=lw, **dict(kw, return_lse=True, sinks=sk))
        out[:, qi], lse[:, qi] = o, s
    return (out, lse) if kw.get("return_lse") else out


def attend_rows(q: Tensor, k: Tensor, v: Tensor, lens: Tensor, lw: Optional[Tensor], *, scale=None, backend=None,
                dense_dtype=None, pad: Optional[Tensor] = None, softcap=None, sinks: Optional[Tensor] = None,
                max_chunk_elems: int = 1 << 24) -> Tensor:
    """attend_rows: causal attention of ``q [B, Hq, Tq, D]`` on rows ``k, v [B, H, T, D]`` whose valid slots are
    ``[pad, pad + lens)`` (``pad [B, H]``, default 0: slot-major rows; ``pad = T - lens``: left-padded rows),
    with optional per-slot log-weights ``lw [B, H, T]``; the Tq queries are the last Tq valid slots of each
    row. One query: ``sparse_decode_attention`` over the valid slots (``backend`` "triton"/"reference",
    else automatic); several: dense SDPA with an additive mask in ``dense_dtype`` (default ``q.dtype``;
    float32 is needed for log-weights). With ``softcap`` / ``sinks [Hq]`` (see the module docstring) the
    several-query path is a float32 masked softmax (``softcap * tanh(s / softcap)``, then the log-weight,
    then the mask; the sink joins the denominator: the shared softmax of the references,
    ``sparsattn.kernels.block_sparse.reference.apply_softcap_sinks``), ``max_chunk_elems`` scores at a time."""
    B, Hq, Tq, D = q.shape
    H, T = k.shape[1], k.shape[2]
    dev = k.device
    softcap = check_softcap(softcap)
    sinks = check_sinks(sinks, Hq, q.device, values=Tq > 1)  # one query: the kernel checks the values
    lens = lens.to(dev).long()
    start = torch.zeros_like(lens) if pad is None else pad.to(dev).long()
    if Tq == 1:
        idx = (start[..., None] + torch.arange(T, device=dev)).clamp(max=max(T - 1, 0))
        tp = TokenPattern(idx.to(torch.int32).contiguous(), lens.to(torch.int32).contiguous(), T)
        lws = None if lw is None else torch.gather(lw.to(dev), 2, idx)
        be = backend if backend in ("triton", "reference") else None
        return sparse_decode_attention(q[:, :, 0], k, v, tp, scale=scale, log_weight=lws, backend=be,
                                       softcap=softcap, sinks=sinks)[:, :, None]
    j = torch.arange(T, device=dev)
    end = (start + lens)[:, :, None, None]  # [B, H, 1, 1]
    i = torch.arange(Tq, device=dev)[:, None]
    keep = (j >= start[:, :, None, None]) & (j < end) & (j <= end - Tq + i)  # [B, H, Tq, T]
    g = Hq // H
    kk, vv = (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)) if g > 1 else (k, v)
    if softcap is not None or sinks is not None:
        return _capped_rows(q, kk, vv, keep.repeat_interleave(g, 1), None if lw is None else lw.repeat_interleave(g, 1),
                            scale, softcap, sinks, max_chunk_elems)
    w = torch.zeros((), device=dev) if lw is None else lw.to(dev).float()[:, :, None, :]
    bias = torch.where(keep, w, torch.full((), float("-inf"), device=dev))
    dt = q.dtype if dense_dtype is None else dense_dtype
    bias = bias.repeat_interleave(g, 1).to(dt)
    out = F.scaled_dot_product_attention(q.to(dt), kk.to(dt), vv.to(dt), attn_mask=bias, scale=scale)
    return out.to(q.dtype)


def _capped_rows(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, lw: Optional[Tensor], scale, softcap, sinks,
                 max_chunk_elems: int) -> Tensor:
    """Masked attention of ``q [B, Hq, Tq, D]`` on ``k, v`` (per query head) with soft-capped scores,
    per-slot log-weights ``lw [B, Hq, T]`` and sink logits, in float32, a chunk of query rows at a time."""
    from ..kernels.block_sparse.reference import apply_softcap_sinks

    B, Hq, Tq, D = q.shape
    T = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    kf, vf = k.float(), v.float()
    w = None if lw is None else lw.to(q.device).float()[:, :, None, :]
    step = max(1, max_chunk_elems // max(B * Hq * T, 1))
    parts = []
    for r0 in range(0, Tq, step):
        s = torch.matmul(q[:, :, r0:r0 + step].float(), kf.transpose(-1, -2)) * scale
        if softcap is not None:  # the cap first: the log-weight counts merged tokens of a capped score
            s = softcap * torch.tanh(s / softcap)
        if w is not None:
            s = s + w
        p, _ = apply_softcap_sinks(s, keep[:, :, r0:r0 + step], None, sinks)
        parts.append(torch.matmul(p, vf))
    return torch.cat(parts, 2).to(q.dtype) if parts else q.new_zeros(B, Hq, 0, v.shape[-1])


__all__ = ["attend_one", "attend_groups", "attend_rows"]
