"""Triton: sparse decode attention (token / page gather, GQA-packed, split-K with an LSE merge).

One program handles one (batch, pattern row, split): all the query heads that share the row's
selection (a whole GQA group when the pattern has one row per KV head), so each selected K/V
row is read once. The selection (``count * page_size`` tokens, or ``kv_len`` tokens when dense)
is cut into ``num_splits`` slices (flash-decoding); every split writes a partial output and
log-sum-exp, and the merge is fused into the same launch: each split program takes a ticket from a
per-(batch, row) counter after writing its partial, and the program that takes the last ticket
merges the partials of that row and resets the counter (one kernel launch per call; counters and
partials live in buffers cached per device and stream, the counters zero between calls).
``fused_merge=False`` uses a second small merge kernel instead. With one split the kernel writes
the final output directly. KV may be contiguous ``[B, Hkv, T, D]`` or paged
``[n_pages, Hkv, P, D]`` with a block table ``[B, max_pages]``.

Only long-standing Triton APIs are used (tested with triton 3.6 and 3.9).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _decode_kernel(Q, K, V, IDX, CNT, LW, KVL, BT, O, L, OF, LF, SEM, SINKS,
                   qk_scale, cap2,
                   stride_qb, stride_qh,
                   stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt,
                   stride_ib, stride_ir, stride_cb, stride_cr, stride_wb, stride_wr,
                   stride_btb, stride_klb, stride_klh,
                   stride_ob, stride_oh, stride_os,
                   stride_lb, stride_lh,
                   stride_ofb, stride_ofh, stride_lfb, stride_lfh,
                   split_len,
                   GP: tl.constexpr, ROWS_PER_KV: tl.constexpr, PAGE: tl.constexpr, CPS: tl.constexpr,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                   DENSE: tl.constexpr, PAGED: tl.constexpr, HAS_LW: tl.constexpr, DIRECT: tl.constexpr,
                   FUSED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    b = tl.program_id(0)
    r = tl.program_id(1)
    sp = tl.program_id(2)
    kvh = r // ROWS_PER_KV
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < GP
    dmask = offs_d < D
    qh = r * GP + offs_h
    q = tl.load(Q + b * stride_qb + qh[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:  # the CPU interpreter's bf16 tl.dot is wrong (triton 3.9): compute in fp32 there
        q = q.to(tl.float32)
    kvlen = tl.load(KVL + b * stride_klb + kvh * stride_klh)  # per sequence (stride_klh 0) or per KV head
    if DENSE:
        n_sel = kvlen
    else:
        n_sel = tl.load(CNT + b * stride_cb + r * stride_cr) * PAGE
    start = sp * split_len
    end = tl.minimum(start + split_len, n_sel)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    if HAS_SINKS:
        # split 0 starts its online softmax with the head's sink logit (a term exp(sink) with no value):
        # its partial lse then carries the sink, and the LSE merge counts it exactly once
        first = (offs_h * 0 + sp) == 0
        sk = tl.load(SINKS + qh, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = tl.where(first, sk, m_i)
        l_i = tl.where(first, 1.0, l_i)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        jmask = offs_j < end
        if DENSE:
            tok = offs_j
        else:
            e = offs_j // PAGE
            ix = tl.load(IDX + b * stride_ib + r * stride_ir + e, mask=jmask, other=0)
            tok = ix * PAGE + offs_j % PAGE
        valid = jmask & (tok < kvlen)
        if PAGED:
            pg = tl.load(BT + b * stride_btb + tok // CPS, mask=valid, other=0).to(tl.int64)
            koff = pg * stride_kb + kvh * stride_kh + (tok % CPS) * stride_kt
            voff = pg * stride_vb + kvh * stride_vh + (tok % CPS) * stride_vt
        else:
            tok64 = tok.to(tl.int64)
            koff = b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + tok64 * stride_kt
            voff = b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + tok64 * stride_vt
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(K + koff[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + voff[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_H, BLOCK_N], log2 units
        if SOFTCAP:  # cap2 * tanh(s / cap2), cap2 = softcap * log2(e); tanh from exp2 (saturates, no NaN)
            s = cap2 * (1.0 - 2.0 / (tl.exp2(s / cap2 * 2.8853900817779268) + 1.0))
        if HAS_LW:
            w = tl.load(LW + b * stride_wb + r * stride_wr + e, mask=jmask, other=0.0)
            s = s + w[None, :] * 1.4426950408889634
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    omask = hmask[:, None] & dmask[None, :]
    optr = O + b * stride_ob + qh[:, None] * stride_oh + sp * stride_os + offs_d[None, :]
    if DIRECT:
        tl.store(optr, out.to(O.dtype.element_ty), mask=omask)
    else:
        tl.store(optr, out, mask=omask)
    tl.store(L + b * stride_lb + qh * stride_lh + sp, lse, mask=hmask)
    if FUSED:
        # split-K merge in the same launch: the last split program of this (batch, row) merges
        n_split = tl.num_programs(2)
        sem_ptr = SEM + b * tl.num_programs(1) + r
        tl.debug_barrier()  # every thread's partial stores precede the ticket (released by the atomic)
        ticket = tl.atomic_add(sem_ptr, 1, sem="acq_rel")
        if ticket == n_split - 1:
            tl.atomic_xchg(sem_ptr, 0)  # zero again for the next call on this stream
            m_f = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
            l_f = tl.zeros([BLOCK_H], dtype=tl.float32)
            acc_f = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
            for s in range(0, n_split):
                # .cg: read the other programs' partials from L2, never a stale L1 line
                ls = tl.load(L + b * stride_lb + qh * stride_lh + s, mask=hmask, other=float("-inf"),
                             cache_modifier=".cg")
                os_ = tl.load(O + b * stride_ob + qh[:, None] * stride_oh + s * stride_os + offs_d[None, :],
                              mask=omask, other=0.0, cache_modifier=".cg")
                m_n = tl.maximum(m_f, ls)
                m_s = tl.where(m_n == float("-inf"), 0.0, m_n)
                a = tl.exp(m_f - m_s)
                w = tl.exp(ls - m_s)
                acc_f = acc_f * a[:, None] + os_ * w[:, None]
                l_f = l_f * a + w
                m_f = m_n
            ok = l_f > 0
            out_f = acc_f / tl.where(ok, l_f, 1.0)[:, None]
            lse_f = tl.where(ok, m_f + tl.log(tl.where(ok, l_f, 1.0)), float("-inf"))
            tl.store(OF + b * stride_ofb + qh[:, None] * stride_ofh + offs_d[None, :],
                     out_f.to(OF.dtype.element_ty), mask=omask)
            tl.store(LF + b * stride_lfb + qh * stride_lfh, lse_f, mask=hmask)


@triton.jit
def _merge_kernel(OP, LP, O, L, S, stride_opb, stride_oph, stride_ops, stride_lpb, stride_lph,
                  stride_ob, stride_oh, stride_lb, H,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < S
    lse = tl.load(LP + b * stride_lpb + h * stride_lph + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(smask, tl.exp(lse - m_safe), 0.0)
    tot = tl.sum(w, 0)
    o = tl.load(OP + b * stride_opb + h * stride_oph + offs_s[:, None] * stride_ops + offs_d[None, :],
                mask=smask[:, None] & (offs_d[None, :] < D), other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)
    tl.store(L + b * stride_lb + h, tl.where(tot > 0, m + tl.log(tl.where(tot > 0, tot, 1.0)), float("-inf")))


_SM: dict = {}
_DUMMY: dict = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM:
        _SM[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM[key]


def _dummy(device, dtype) -> torch.Tensor:
    """A cached 1-element placeholder for unused pointer arguments (no allocation per call)."""
    key = (str(device), dtype)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(1, dtype=dtype, device=device)
    return _DUMMY[key]


_SEMS: dict = {}


def _stream_buffers(device, n_sem: int, n_part: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(zeroed int32 ticket counters >= ``n_sem``, float32 partial workspace >= ``n_part``) for the
    split-K path, cached per device and stream: launches on one stream run in order, each launch
    leaves its counters at zero and reads its partials before the next launch writes them, so reuse
    is safe; another stream gets its own buffers. Inside a CUDA-graph capture fresh buffers are
    allocated (from the graph's pool, zeroed by a captured memset) so no cached buffer is tied to a
    graph."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return (torch.zeros(max(n_sem, 1), dtype=torch.int32, device=device),
                torch.empty(max(n_part, 1), dtype=torch.float32, device=device))
    sid = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), sid)
    sem, part = _SEMS.get(key, (None, None))
    if sem is None or sem.numel() < n_sem:
        sem = torch.zeros(max(n_sem, 1024), dtype=torch.int32, device=device)
    if part is None or part.numel() < n_part:
        part = torch.empty(max(n_part, 1 << 16), dtype=torch.float32, device=device)
    _SEMS[key] = (sem, part)
    return sem, part


def choose_splits(n_programs: int, max_sel: int, block_n: int, device) -> int:
    """Number of split-K slices: the most that keep the grid within 4 programs per SM (about two
    full waves: 2 programs of this kernel are resident per SM at head_dim 128), each split with at
    least 2 blocks of ``block_n`` selected tokens, at most 64. Rounding *down* matters: on the H200
    at 128K, batch 8, 8 KV heads, 1/16 budget (64 rows) S=8 (512 programs) reads at 3.7-3.8 TB/s,
    S=9 (576: a third, nearly empty wave) at 3.3, S=5 at 3.5-3.6, S=16 at 3.4 (scripts/decode_diag.py)."""
    if max_sel <= 0 or n_programs <= 0:
        return 1
    want = max(1, (4 * _sm_count(device)) // n_programs)
    most = max(1, -(-max_sel // (2 * block_n)))
    return int(min(want, most, 64))


def sparse_decode_triton(q, k_cache, v_cache, indices, counts, kv_lens, *, scale, page_size, log_weight=None,
                         block_table=None, num_splits=None, block_n=None, num_warps=4, num_stages=None,
                         fused_merge=True, softcap=None, sinks=None):
    """sparse_decode_triton: launch the decode kernel on validated inputs (see ``sparse_decode_attention``).

    ``indices [B', R, max_n]`` / ``counts [B', R]`` (``B'`` = 1 or B; R = pattern rows, 1, Hkv or Hq)
    or None for dense; ``kv_lens`` int32 ``[B]`` (or ``[B, Hkv]`` per KV head) on the device.
    ``fused_merge``: merge the split-K partials inside the one launch (default) or in a second
    kernel. ``num_stages``: Triton's software pipelining depth (None = Triton's default).
    ``softcap`` (positive float) caps the scores before the log-weights; ``sinks`` float ``[Hq]`` are
    learned sink logits in every row's denominator (in the returned lse too).
    Returns ``(out [B, Hq, D], lse [B, Hq])``.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    dense = indices is None
    R = Hkv if dense else max(indices.shape[1], Hkv)
    if not dense and indices.shape[1] not in (1, R):
        raise ValueError(f"indices: expected 1 or {R} rows, got {indices.shape[1]}")
    GP = Hq // R
    ROWS_PER_KV = R // Hkv
    q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    paged = block_table is not None
    cps = k_cache.shape[2] if paged else 1
    T = block_table.shape[1] * cps if paged else k_cache.shape[2]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_H = max(16, triton.next_power_of_2(GP))
    if block_n is None:
        block_n = 64 if BLOCK_D <= 128 else 32
    max_sel = T if dense else indices.shape[-1] * page_size
    max_sel = min(max_sel, T)
    S = num_splits or choose_splits(B * R, max_sel, block_n, q.device)
    split_len = max(block_n, -(-max(max_sel, 1) // S))
    split_len = -(-split_len // block_n) * block_n
    S = max(1, -(-max(max_sel, 1) // split_len))
    dummy = _dummy(q.device, torch.int32)
    if dense:
        idx, cnt, sib, sir, scb, scr = dummy, dummy, 0, 0, 0, 0
    else:
        idx, cnt = indices, counts
        if idx.stride(-1) != 1:
            idx = idx.contiguous()
        sib = idx.stride(0) if idx.shape[0] > 1 else 0
        sir = idx.stride(1) if idx.shape[1] > 1 else 0
        scb = cnt.stride(0) if cnt.shape[0] > 1 else 0
        scr = cnt.stride(1) if cnt.shape[1] > 1 else 0
    if log_weight is not None:
        lw = log_weight.float()
        if lw.stride(-1) != 1:
            lw = lw.contiguous()
        swb = lw.stride(0) if lw.shape[0] > 1 else 0
        swr = lw.stride(1) if lw.shape[1] > 1 else 0
    else:
        lw, swb, swr = _dummy(q.device, torch.float32), 0, 0
    bt = block_table if paged else dummy
    sbt = bt.stride(0) if paged else 0
    upcast = q.device.type == "cpu" and q.dtype == torch.bfloat16
    prec = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    direct = S == 1
    fused = fused_merge and not direct
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    sem = dummy
    if direct:
        so = (out.stride(0), out.stride(1), 0)
        sl = (lse.stride(0), lse.stride(1))
        o_t, l_t = out, lse
    else:
        n_o = B * Hq * S * D
        sem, part = _stream_buffers(q.device, B * R, n_o + B * Hq * S)
        o_t = part[:n_o].view(B, Hq, S, D)
        l_t = part[n_o:n_o + B * Hq * S].view(B, Hq, S)
        so = (S * D * Hq, S * D, D)
        sl = (S * Hq, S)
    if not fused:
        sem = dummy
    qk_scale = float(scale) * LOG2E
    grid = (B, R, S)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _decode_kernel[grid](
        q, k_cache, v_cache, idx, cnt, lw, kv_lens, bt, o_t, l_t, out, lse, sem,
        _dummy(q.device, torch.float32) if sinks is None else sinks.contiguous(),
        qk_scale, float(softcap) * LOG2E if softcap else 1.0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        sib, sir, scb, scr, swb, swr,
        sbt, kv_lens.stride(0), kv_lens.stride(1) if kv_lens.dim() == 2 else 0,
        so[0], so[1], so[2],
        sl[0], sl[1],
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        split_len,
        GP=GP, ROWS_PER_KV=ROWS_PER_KV, PAGE=page_size, CPS=cps,
        D=D, BLOCK_D=BLOCK_D, BLOCK_H=BLOCK_H, BLOCK_N=block_n,
        DENSE=dense, PAGED=paged, HAS_LW=log_weight is not None, DIRECT=direct, FUSED=fused, PREC=prec,
        UPCAST=upcast, SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None, num_warps=num_warps, **extra,
    )
    if direct or fused:
        return out, lse
    _merge_kernel[(B * Hq,)](
        o_t, l_t, out, lse, S, o_t.stride(0), o_t.stride(1), o_t.stride(2), l_t.stride(0), l_t.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), Hq,
        D=D, BLOCK_D=BLOCK_D, BLOCK_S=max(2, triton.next_power_of_2(S)), num_warps=4,
    )
    return out, lse


__all__ = ["sparse_decode_triton", "choose_splits"]


def _register_op():
    """``torch.ops.sparsattn.sparse_decode``: the launch as a custom op, so ``torch.compile`` can trace
    through it (eager calls skip the dispatcher and launch directly)."""
    @torch.library.custom_op("sparsattn::sparse_decode", mutates_args=())
    def sparse_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: Optional[torch.Tensor],
                         counts: Optional[torch.Tensor], kv_lens: torch.Tensor, log_weight: Optional[torch.Tensor],
                         block_table: Optional[torch.Tensor], scale: float, page_size: int,
                         num_splits: int, softcap: float = 0.0,
                         sinks: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = sparse_decode_triton(q, k_cache, v_cache, indices, counts, kv_lens, scale=scale, page_size=page_size,
                                        log_weight=log_weight, block_table=block_table, num_splits=num_splits or None,
                                        softcap=softcap or None, sinks=sinks)
        return out, lse

    @sparse_decode_op.register_fake
    def _(q, k_cache, v_cache, indices, counts, kv_lens, log_weight, block_table, scale, page_size, num_splits,
          softcap=0.0, sinks=None):
        B, Hq, D = q.shape
        return q.new_empty(B, Hq, D), q.new_empty(B, Hq, dtype=torch.float32)

    return sparse_decode_op


try:
    sparse_decode_op = _register_op()
except Exception as e:  # pragma: no cover - torch without torch.library.custom_op
    import warnings

    warnings.warn(f"sparsattn: sparse_decode custom op not registered ({e}); torch.compile will not trace it")
    sparse_decode_op = None
