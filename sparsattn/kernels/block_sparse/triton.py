"""Triton kernels: block-sparse attention forward and backward on a BlockPattern.

One program per (query block, query head, sequence). It walks the query block's *full* key
blocks (no element mask), then its *partial* blocks (bounds, causal diagonal and an optional
tile from the pattern's mask bank), then the pattern's key *columns* that lie outside the
listed blocks (gathered rows: the vertical lines of MInference), all merged by one online
softmax. GQA reads each KV head in place (no repeated K/V). Sequences are addressed by start
offset and length, so a padded batch and packed sequences use the same kernel.

Backward: dQ per query block (same walk); dK/dV per key tile over the transposed pattern
(the query blocks that use it, for every query head of the KV group: no atomics); the
columns' dK/dV are accumulated with float32 atomics in the dQ pass.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(base, rows, offs_d, stride_t, row_lim, D: tl.constexpr, BLOCK_D: tl.constexpr,
               EVEN: tl.constexpr):
    """[len(rows), BLOCK_D] tile; rows >= row_lim and columns >= D read as 0."""
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if EVEN and D == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(rows[:, None] < row_lim) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _load_rows_t(base, rows, offs_d, stride_t, row_lim, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 EVEN: tl.constexpr):
    """Transposed tile [BLOCK_D, len(rows)]."""
    ptrs = base + rows[None, :] * stride_t + offs_d[:, None]
    if EVEN and D == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(rows[None, :] < row_lim) & (offs_d[:, None] < D), other=0.0)


@triton.jit
def _in_sorted(list_ptr, n, vals, LOG_LEN: tl.constexpr):
    """Vectorised binary search: is each of ``vals`` among the first ``n`` sorted entries?"""
    lo = tl.zeros_like(vals)
    hi = tl.zeros_like(vals) + n
    for _ in tl.static_range(LOG_LEN):
        active = lo < hi
        mid = (lo + hi) // 2
        x = tl.load(list_ptr + mid, mask=active, other=0)
        go_right = active & (x < vals)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(active & (x >= vals), mid, hi)
    x = tl.load(list_ptr + lo, mask=lo < n, other=-1)
    return (lo < n) & (x == vals)


@triton.jit
def _in_list(list_ptr, n, vals, LIST: tl.constexpr, LOG_LEN: tl.constexpr):
    """Is each of ``vals`` among the first ``n`` entries of a list? ``LIST > 0``: compare against the
    list in chunks of 32 (independent, cache-resident loads: no dependent load chain, which made the
    column path latency-bound); ``LIST == 0``: binary search (long lists)."""
    if LIST == 0:
        return _in_sorted(list_ptr, n, vals, LOG_LEN)
    CH: tl.constexpr = 32
    hit = tl.zeros_like(vals)
    for c in tl.static_range(LIST // CH):
        i = c * CH + tl.arange(0, CH)
        lst = tl.load(list_ptr + i, mask=i < n, other=-1)
        hit += tl.sum((vals[:, None] == lst[None, :]).to(vals.dtype), 1)
    return hit > 0


@triton.jit
def _elem_mask(rows, cols, kv_len, off, bank_ptr, mid, tile_r, tile_c,
               CAUSAL: tl.constexpr, HAS_BANK: tl.constexpr, BLOCK_KP: tl.constexpr, BANK_TILE: tl.constexpr):
    """Element mask of a partial block: bounds, causal (bottom-right), bank tile (mid < 0: none)."""
    ok = cols[None, :] < kv_len
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + off)
    if HAS_BANK:
        # mid < 0: no tile (only bounds/causal). Vector-only logic (the interpreter rejects bool scalars in masks).
        mid_v = tile_r[:, None] * 0 + tile_c[None, :] * 0 + mid
        tv = tl.load(bank_ptr + tl.maximum(mid_v, 0) * BANK_TILE + tile_r[:, None] * BLOCK_KP + tile_c[None, :])
        ok = ok & ((tv != 0) | (mid_v < 0))
    return ok


@triton.jit
def _tanh(x):
    """tanh from exp2 (portable: no libdevice); saturates to +-1 without overflow to NaN."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2 * log2(e)


@triton.jit
def _softcap(qk, cap2, SOFTCAP: tl.constexpr):
    """Scores in log2 units -> ``cap2 * tanh(qk / cap2)`` with ``cap2 = softcap * log2(e)`` (Gemma 2's
    ``softcap * tanh(s / softcap)`` in natural units); unchanged when not SOFTCAP."""
    if SOFTCAP:
        qk = cap2 * _tanh(qk / cap2)
    return qk


@triton.jit
def _dsoftcap(ds, qk_capped, cap2, SOFTCAP: tl.constexpr):
    """Chain rule through the cap: ``d tanh(x) / dx = 1 - tanh(x)^2`` with ``tanh = capped / cap2``."""
    if SOFTCAP:
        t = qk_capped / cap2
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, cols, rows, offs_d, kv_len, qk_scale,
              ok, cap2, MASKED: tl.constexpr, EVEN: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    kt = _load_rows_t(k_base, cols, offs_d, stride_kt, kv_len, D, BLOCK_D, EVEN).to(q.dtype)
    qk = tl.dot(q, kt, input_precision=PREC) * qk_scale
    qk = _softcap(qk, cap2, SOFTCAP)
    if MASKED:
        qk = tl.where(ok, qk, float("-inf"))
    elif not EVEN:
        qk = tl.where(cols[None, :] < kv_len, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_rows(v_base, cols, offs_d, stride_vt, kv_len, D, BLOCK_D, EVEN).to(q.dtype)
    acc += tl.dot(p.to(q.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _bs_fwd_kernel(
    Q, K, V, O, LSE,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_lb, s_lh,
    Q_OFF, Q_LEN, K_OFF, K_LEN,
    FCNT, FIDX, PCNT, PIDX, MIDS, BANK, CIDX, CCNT, SINKS,
    s_fcb, s_fch, s_fib, s_fih, s_fiq, s_pcb, s_pch, s_pib, s_pih, s_piq, s_ccb, s_cch, s_cib, s_cih,
    qk_scale, cap2, GROUP, PH_DIV, CH_DIV, P_OFF,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KP: tl.constexpr, CAUSAL: tl.constexpr, HAS_BANK: tl.constexpr, HAS_COLS: tl.constexpr,
    EVEN: tl.constexpr, LOG_F: tl.constexpr, LOG_P: tl.constexpr, LIST_F: tl.constexpr, LIST_P: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_len = tl.load(Q_LEN + b)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    kv_len = tl.load(K_LEN + b)
    q_off = tl.load(Q_OFF + b)
    k_off = tl.load(K_OFF + b)
    off = kv_len - q_len
    kvh = h // GROUP
    ph = h // PH_DIV
    SUB: tl.constexpr = BLOCK_KP // BLOCK_N
    BANK_TILE: tl.constexpr = BLOCK_M * BLOCK_KP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * s_qb + h * s_qh + q_off * s_qt
    k_base = K + b * s_kb + kvh * s_kh + k_off * s_kt
    v_base = V + b * s_vb + kvh * s_vh + k_off * s_vt
    q = _load_rows(q_base, offs_m, offs_d, s_qt, q_len, D, BLOCK_D, False)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:
        # the head's sink logit starts the online softmax: one term exp(sink) with no value, so the
        # denominator (and the lse) include it and the output is scaled by 1 - P(sink)
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
        l_i += 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dummy_ok = offs_m[:, None] >= 0

    f_list = FIDX + b * s_fib + ph * s_fih + pid_m * s_fiq
    n_full = tl.load(FCNT + b * s_fcb + ph * s_fch + pid_m)
    # one flat loop over (block, sub-tile): a single K/V load per iteration, so the software
    # pipeline's buffers do not multiply by SUB (key blocks wider than BLOCK_N)
    if off < P_OFF:
        # causal, and this sequence's diagonal lies left of the pattern's (kv_len - q_len smaller than
        # the pattern's kv_len - q_len): a full block can cross it, so mask full blocks too. Not
        # software-pipelined: each pipelined loop keeps its own stages of K and V tiles, and this loop
        # beside the one below asked for 416 KB at head_dim 128 in bf16 whenever a length was not a multiple
        # of the block (H100, triton 3.6, 2026-12-05;
        # tests/kernels/test_smem_budget.py compiles every launch for sm_90 and checks 227 KB)
        for j in tl.range(0, n_full * SUB, num_stages=1):
            kb = tl.load(f_list + j // SUB)
            cols = kb * BLOCK_KP + (j % SUB) * BLOCK_N + offs_n
            ok = (cols[None, :] < kv_len) & (cols[None, :] <= offs_m[:, None] + off)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, cols, offs_m, offs_d, kv_len,
                                      qk_scale, ok, cap2, True, EVEN, D, BLOCK_D, PREC, SOFTCAP)
    else:
        for j in range(0, n_full * SUB):
            kb = tl.load(f_list + j // SUB)
            cols = kb * BLOCK_KP + (j % SUB) * BLOCK_N + offs_n
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, cols, offs_m, offs_d, kv_len,
                                      qk_scale, dummy_ok, cap2, False, EVEN, D, BLOCK_D, PREC, SOFTCAP)

    p_list = PIDX + b * s_pib + ph * s_pih + pid_m * s_piq
    m_list = MIDS + b * s_pib + ph * s_pih + pid_m * s_piq
    n_part = tl.load(PCNT + b * s_pcb + ph * s_pch + pid_m)
    tile_r = tl.arange(0, BLOCK_M)
    for j in range(0, n_part * SUB):
        kb = tl.load(p_list + j // SUB)
        mid = -1
        if HAS_BANK:
            mid = tl.load(m_list + j // SUB)
        tc = (j % SUB) * BLOCK_N + offs_n
        cols = kb * BLOCK_KP + tc
        ok = _elem_mask(offs_m, cols, kv_len, off, BANK, mid, tile_r, tc, CAUSAL, HAS_BANK, BLOCK_KP, BANK_TILE)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, cols, offs_m, offs_d, kv_len,
                                  qk_scale, ok, cap2, True, EVEN, D, BLOCK_D, PREC, SOFTCAP)

    if HAS_COLS:
        ch = h // CH_DIV
        c_list = CIDX + b * s_cib + ch * s_cih
        n_cols = tl.load(CCNT + b * s_ccb + ch * s_cch)
        for c0 in tl.range(0, n_cols, BLOCK_N, num_stages=1):  # pipelined gathers: 3.5x slower (H200)
            offs_c = c0 + offs_n
            valid = offs_c < n_cols
            cols = tl.load(c_list + offs_c, mask=valid, other=0)
            kbc = cols // BLOCK_KP
            listed = _in_list(f_list, n_full, kbc, LIST_F, LOG_F) | _in_list(p_list, n_part, kbc, LIST_P, LOG_P)
            ok = (valid & ~listed & (cols < kv_len))[None, :] & (offs_m[:, None] < q_len)
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + off)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, cols, offs_m, offs_d, kv_len,
                                      qk_scale, ok, cap2, True, False, D, BLOCK_D, PREC, SOFTCAP)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * s_ob + h * s_oh + (q_off + offs_m)[:, None] * s_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D))
    # natural-log LSE; -inf for rows without any key
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    tl.store(LSE + b * s_lb + h * s_lh + q_off + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DKC, DVC,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_lb, s_lh,
    s_cb, s_chh, s_ct,
    Q_OFF, Q_LEN, K_OFF, K_LEN,
    FCNT, FIDX, PCNT, PIDX, MIDS, BANK, CIDX, CCNT,
    s_fcb, s_fch, s_fib, s_fih, s_fiq, s_pcb, s_pch, s_pib, s_pih, s_piq, s_ccb, s_cch, s_cib, s_cih,
    sm_scale, qk_scale, cap2, GROUP, PH_DIV, CH_DIV, P_OFF,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KP: tl.constexpr, CAUSAL: tl.constexpr, HAS_BANK: tl.constexpr, HAS_COLS: tl.constexpr,
    EVEN: tl.constexpr, LOG_F: tl.constexpr, LOG_P: tl.constexpr, LIST_F: tl.constexpr, LIST_P: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """dQ for one query block (q/do/dq share strides s_q*, O strides s_o* are for DO)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_len = tl.load(Q_LEN + b)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    kv_len = tl.load(K_LEN + b)
    q_off = tl.load(Q_OFF + b)
    k_off = tl.load(K_OFF + b)
    off = kv_len - q_len
    kvh = h // GROUP
    ph = h // PH_DIV
    SUB: tl.constexpr = BLOCK_KP // BLOCK_N
    BANK_TILE: tl.constexpr = BLOCK_M * BLOCK_KP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * s_qb + h * s_qh + q_off * s_qt
    do_base = DO + b * s_ob + h * s_oh + q_off * s_ot
    k_base = K + b * s_kb + kvh * s_kh + k_off * s_kt
    v_base = V + b * s_vb + kvh * s_vh + k_off * s_vt
    q = _load_rows(q_base, offs_m, offs_d, s_qt, q_len, D, BLOCK_D, False)
    do = _load_rows(do_base, offs_m, offs_d, s_ot, q_len, D, BLOCK_D, False)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + b * s_lb + h * s_lh + q_off + offs_m, mask=offs_m < q_len, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + b * s_lb + h * s_lh + q_off + offs_m, mask=offs_m < q_len, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    f_list = FIDX + b * s_fib + ph * s_fih + pid_m * s_fiq
    n_full = tl.load(FCNT + b * s_fcb + ph * s_fch + pid_m)
    for j in range(0, n_full * SUB):  # flat (block, sub-tile) loop, as in the forward
        kb = tl.load(f_list + j // SUB)
        cols = kb * BLOCK_KP + (j % SUB) * BLOCK_N + offs_n
        kt = _load_rows_t(k_base, cols, offs_d, s_kt, kv_len, D, BLOCK_D, EVEN).to(q.dtype)
        vt = _load_rows_t(v_base, cols, offs_d, s_vt, kv_len, D, BLOCK_D, EVEN).to(q.dtype)
        qk = _softcap(tl.dot(q, kt, input_precision=PREC) * qk_scale, cap2, SOFTCAP)
        qc = qk  # capped, unmasked: the cap's derivative
        if not EVEN:
            qk = tl.where(cols[None, :] < kv_len, qk, float("-inf"))
        if off < P_OFF:  # this sequence's causal diagonal can cross a full block (see the forward)
            qk = tl.where(cols[None, :] <= offs_m[:, None] + off, qk, float("-inf"))
        p = tl.math.exp2(qk - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = _dsoftcap(p * (dp - delta[:, None]), qc, cap2, SOFTCAP)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)

    p_list = PIDX + b * s_pib + ph * s_pih + pid_m * s_piq
    m_list = MIDS + b * s_pib + ph * s_pih + pid_m * s_piq
    n_part = tl.load(PCNT + b * s_pcb + ph * s_pch + pid_m)
    tile_r = tl.arange(0, BLOCK_M)
    for j in range(0, n_part * SUB):
        kb = tl.load(p_list + j // SUB)
        mid = -1
        if HAS_BANK:
            mid = tl.load(m_list + j // SUB)
        tc = (j % SUB) * BLOCK_N + offs_n
        cols = kb * BLOCK_KP + tc
        ok = _elem_mask(offs_m, cols, kv_len, off, BANK, mid, tile_r, tc, CAUSAL, HAS_BANK, BLOCK_KP, BANK_TILE)
        kt = _load_rows_t(k_base, cols, offs_d, s_kt, kv_len, D, BLOCK_D, EVEN).to(q.dtype)
        vt = _load_rows_t(v_base, cols, offs_d, s_vt, kv_len, D, BLOCK_D, EVEN).to(q.dtype)
        qk = _softcap(tl.dot(q, kt, input_precision=PREC) * qk_scale, cap2, SOFTCAP)
        qc = qk  # capped, unmasked: the cap's derivative
        qk = tl.where(ok, qk, float("-inf"))
        p = tl.math.exp2(qk - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = _dsoftcap(p * (dp - delta[:, None]), qc, cap2, SOFTCAP)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)

    if HAS_COLS:
        ch = h // CH_DIV
        c_list = CIDX + b * s_cib + ch * s_cih
        n_cols = tl.load(CCNT + b * s_ccb + ch * s_cch)
        dkc_base = DKC + b * s_cb + kvh * s_chh + k_off * s_ct
        dvc_base = DVC + b * s_cb + kvh * s_chh + k_off * s_ct
        for c0 in tl.range(0, n_cols, BLOCK_N, num_stages=1):  # pipelined gathers: 3.5x slower (H200)
            offs_c = c0 + offs_n
            valid = offs_c < n_cols
            cols = tl.load(c_list + offs_c, mask=valid, other=0)
            kbc = cols // BLOCK_KP
            listed = _in_list(f_list, n_full, kbc, LIST_F, LOG_F) | _in_list(p_list, n_part, kbc, LIST_P, LOG_P)
            keep = valid & ~listed & (cols < kv_len)
            ok = keep[None, :] & (offs_m[:, None] < q_len)
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + off)
            kt = _load_rows_t(k_base, cols, offs_d, s_kt, kv_len, D, BLOCK_D, False).to(q.dtype)
            vt = _load_rows_t(v_base, cols, offs_d, s_vt, kv_len, D, BLOCK_D, False).to(q.dtype)
            qk = _softcap(tl.dot(q, kt, input_precision=PREC) * qk_scale, cap2, SOFTCAP)
            qc = qk
            qk = tl.where(ok, qk, float("-inf"))
            p = tl.math.exp2(qk - lse2[:, None])
            dp = tl.dot(do, vt, input_precision=PREC)
            ds = _dsoftcap(p * (dp - delta[:, None]), qc, cap2, SOFTCAP)
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
            # column dK/dV: [BLOCK_N, BLOCK_D], accumulated across query blocks with atomics
            dv_c = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk_c = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * sm_scale
            cmask = keep[:, None] & (offs_d[None, :] < D)
            tl.atomic_add(dvc_base + cols[:, None] * s_ct + offs_d[None, :], dv_c, mask=cmask)
            tl.atomic_add(dkc_base + cols[:, None] * s_ct + offs_d[None, :], dk_c, mask=cmask)

    dq = dq * sm_scale
    dq_ptrs = DQ + b * s_qb + h * s_qh + (q_off + offs_m)[:, None] * s_qt + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D))


@triton.jit
def _bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_lb, s_lh,
    Q_OFF, Q_LEN, K_OFF, K_LEN,
    TCNT, TIDX, TSLOT, MIDS, BANK,
    s_tcb, s_tch, s_tib, s_tih, s_tik, s_pib, s_pih, s_piq,
    sm_scale, qk_scale, cap2, GROUP, PH_DIV, MAX_FULL,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_QP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, CAUSAL: tl.constexpr, HAS_BANK: tl.constexpr,
    EVEN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """dK, dV for one tile of BLOCK_N keys (DK/DV share K's/V's strides)."""
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    kv_len = tl.load(K_LEN + b)
    start_n = pid_n * BLOCK_N
    if start_n >= kv_len:
        return
    q_len = tl.load(Q_LEN + b)
    q_off = tl.load(Q_OFF + b)
    k_off = tl.load(K_OFF + b)
    off = kv_len - q_len
    kb = start_n // BLOCK_KP
    SUBM: tl.constexpr = BLOCK_QP // BLOCK_M
    BANK_TILE: tl.constexpr = BLOCK_QP * BLOCK_KP

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * s_kb + kvh * s_kh + k_off * s_kt
    v_base = V + b * s_vb + kvh * s_vh + k_off * s_vt
    k = _load_rows(k_base, offs_n, offs_d, s_kt, kv_len, D, BLOCK_D, False)
    v = _load_rows(v_base, offs_n, offs_d, s_vt, kv_len, D, BLOCK_D, False)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    tile_c = offs_n - kb * BLOCK_KP

    for g in range(0, GROUP):
        h = kvh * GROUP + g
        ph = h // PH_DIV
        q_base = Q + b * s_qb + h * s_qh + q_off * s_qt
        do_base = DO + b * s_ob + h * s_oh + q_off * s_ot
        l_base = LSE + b * s_lb + h * s_lh + q_off
        d_base = DELTA + b * s_lb + h * s_lh + q_off
        t_cnt = tl.load(TCNT + b * s_tcb + ph * s_tch + kb)
        t_row = b * s_tib + ph * s_tih + kb * s_tik
        for jj in range(0, t_cnt * SUBM):  # flat (query block, sub-tile) loop: one Q/dO load per iteration
            j = jj // SUBM
            r = jj % SUBM
            qb = tl.load(TIDX + t_row + j)
            slot = tl.load(TSLOT + t_row + j)
            is_part = slot >= MAX_FULL
            mid = -1
            if HAS_BANK:
                mid = tl.load(MIDS + b * s_pib + ph * s_pih + qb * s_piq + tl.maximum(slot - MAX_FULL, 0))
                mid = tl.where(is_part, mid, -1)
            offs_m = qb * BLOCK_QP + r * BLOCK_M + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, offs_m, offs_d, s_qt, q_len, D, BLOCK_D, False).to(k.dtype)
            do = _load_rows(do_base, offs_m, offs_d, s_ot, q_len, D, BLOCK_D, False).to(k.dtype)
            lse = tl.load(l_base + offs_m, mask=offs_m < q_len, other=float("-inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(d_base + offs_m, mask=offs_m < q_len, other=0.0)
            qk_t = _softcap(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale, cap2, SOFTCAP)  # [BLOCK_N, BLOCK_M]
            qc_t = qk_t
            ok = offs_n[:, None] < kv_len
            if CAUSAL:  # full blocks lie below the diagonal, so this is exact for them too
                ok = ok & (offs_n[:, None] <= offs_m[None, :] + off)
            if HAS_BANK:
                tile_r = r * BLOCK_M + tl.arange(0, BLOCK_M)
                mid_v = tile_r[None, :] * 0 + tile_c[:, None] * 0 + mid
                tv = tl.load(BANK + tl.maximum(mid_v, 0) * BANK_TILE + tile_r[None, :] * BLOCK_KP + tile_c[:, None])
                ok = ok & ((tv != 0) | (mid_v < 0))
            qk_t = tl.where(ok, qk_t, float("-inf"))
            p_t = tl.math.exp2(qk_t - lse2[None, :])
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            ds_t = _dsoftcap(p_t * (dp_t - delta[None, :]), qc_t, cap2, SOFTCAP)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)

    dk = dk * sm_scale
    smask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < D)
    tl.store(DK + b * s_kb + kvh * s_kh + (k_off + offs_n)[:, None] * s_kt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=smask)
    tl.store(DV + b * s_vb + kvh * s_vh + (k_off + offs_n)[:, None] * s_vt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=smask)
