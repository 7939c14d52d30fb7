"""Triton: unit scores from compressed key summaries (key bounds per unit; quantised key channels).

One program scores ``BLOCK_N`` units of one (batch, KV head) for all the query heads of its GQA
group (each summary row is read once per group) and reduces over the group in registers, so only
``[B, Hkv, n]`` float32 scores are written (``[B, Hq, n]`` with ``reduce="none"``). Memory-bound:
the bytes read are the summaries themselves. Only long-standing Triton APIs (triton 3.6 and 3.9).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_RED = {"max": 0, "mean": 1, "sum": 2, "none": 3}


@triton.jit
def _reduce_store(s, OUT, b, kvh, offs_h, hmask, offs_n, nmask, stride_ob, stride_oh,
                  GP: tl.constexpr, REDUCE: tl.constexpr, mult):
    if REDUCE == 3:
        ptr = OUT + b * stride_ob + (kvh * GP + offs_h)[:, None] * stride_oh + offs_n[None, :]
        tl.store(ptr, s * mult, mask=hmask[:, None] & nmask[None, :])
    else:
        if REDUCE == 0:
            r = tl.max(tl.where(hmask[:, None], s, float("-inf")), 0)
        else:
            r = tl.sum(tl.where(hmask[:, None], s, 0.0), 0)
            if REDUCE == 1:
                r = r / GP
        tl.store(OUT + b * stride_ob + kvh * stride_oh + offs_n, r * mult, mask=nmask)


@triton.jit
def _bound_kernel(Q, LO, HI, OUT, n, n_kv, mult,
                  stride_qb, stride_qh, stride_lb, stride_lh, stride_ln, stride_hb, stride_hh, stride_hn,
                  stride_ob, stride_oh,
                  GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_N: tl.constexpr, REDUCE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // n_kv
    kvh = bh % n_kv
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    hmask = offs_h < GP
    dmask = offs_d < D
    nmask = offs_n < n
    q = tl.load(Q + b * stride_qb + (kvh * GP + offs_h)[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    m2 = nmask[:, None] & dmask[None, :]
    lo = tl.load(LO + b.to(tl.int64) * stride_lb + kvh * stride_lh + offs_n[:, None].to(tl.int64) * stride_ln
                 + offs_d[None, :], mask=m2, other=0.0)
    hi = tl.load(HI + b.to(tl.int64) * stride_hb + kvh * stride_hh + offs_n[:, None].to(tl.int64) * stride_hn
                 + offs_d[None, :], mask=m2, other=0.0)
    if UPCAST:  # the CPU interpreter's 16-bit tl.dot is unreliable: fp32 there
        q = q.to(tl.float32)
        lo = lo.to(tl.float32)
        hi = hi.to(tl.float32)
    qp = tl.maximum(q, 0.0).to(lo.dtype)
    qn = tl.minimum(q, 0.0).to(lo.dtype)
    s = tl.dot(qp, tl.trans(hi), input_precision=PREC) + tl.dot(qn, tl.trans(lo), input_precision=PREC)
    _reduce_store(s, OUT, b, kvh, offs_h, hmask, offs_n, nmask, stride_ob, stride_oh, GP, REDUCE, mult)


@triton.jit
def _label_kernel(QC, CODES, SCALE, ZERO, OUT, n, n_kv, mult,
                  stride_qb, stride_qh, stride_cb, stride_ch, stride_cn,
                  stride_sb, stride_sh, stride_sn, stride_zb, stride_zh, stride_zn,
                  stride_ob, stride_oh,
                  GP: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, BITS: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, REDUCE: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // n_kv
    kvh = bh % n_kv
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    hmask = offs_h < GP
    nmask = offs_n < n
    qrow = QC + b * stride_qb + (kvh * GP + offs_h) * stride_qh  # [BLOCK_H] pointers
    crow = CODES + b.to(tl.int64) * stride_cb + kvh * stride_ch + offs_n.to(tl.int64) * stride_cn  # [BLOCK_N]
    s = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    qsum = tl.zeros([BLOCK_H], dtype=tl.float32)
    # one byte column at a time: the block's rows are contiguous, so the column loads share cache lines
    for i in tl.static_range(RB):
        by = tl.load(crow + i, mask=nmask, other=0).to(tl.int32)
        if BITS == 4:  # byte i holds channel 2i (low nibble) and 2i + 1 (high nibble)
            q_lo = tl.load(qrow + 2 * i, mask=hmask, other=0.0)
            s += q_lo[:, None] * (by & 15).to(tl.float32)[None, :]
            qsum += q_lo
            if 2 * i + 1 < R:
                q_hi = tl.load(qrow + 2 * i + 1, mask=hmask, other=0.0)
                s += q_hi[:, None] * (by >> 4).to(tl.float32)[None, :]
                qsum += q_hi
        else:
            qv = tl.load(qrow + i, mask=hmask, other=0.0)
            s += qv[:, None] * by.to(tl.float32)[None, :]
            qsum += qv
    sc = tl.load(SCALE + b.to(tl.int64) * stride_sb + kvh * stride_sh + offs_n.to(tl.int64) * stride_sn,
                 mask=nmask, other=0.0).to(tl.float32)
    zr = tl.load(ZERO + b.to(tl.int64) * stride_zb + kvh * stride_zh + offs_n.to(tl.int64) * stride_zn,
                 mask=nmask, other=0.0).to(tl.float32)
    s = s * sc[None, :] + qsum[:, None] * zr[None, :]
    _reduce_store(s, OUT, b, kvh, offs_h, hmask, offs_n, nmask, stride_ob, stride_oh, GP, REDUCE, mult)


def _out(B, Hkv, GP, n, reduce, device):
    return torch.empty(B, Hkv * GP if reduce == "none" else Hkv, n, dtype=torch.float32, device=device)


def bound_scores_triton(q, lo, hi, reduce="max", mult=1.0, block_n=64, num_warps=4):
    """bound_scores_triton: launch on validated inputs (see ``sparsattn.kernels.unit_scores.bound_scores``)."""
    B, Hq, D = q.shape
    Hkv, n = lo.shape[1], lo.shape[2]
    GP = Hq // Hkv
    q = q.contiguous()
    if lo.stride(-1) != 1:
        lo = lo.contiguous()
    if hi.stride(-1) != 1:
        hi = hi.contiguous()
    out = _out(B, Hkv, GP, n, reduce, q.device)
    if n == 0 or B == 0:
        return out
    upcast = q.device.type == "cpu" and lo.dtype != torch.float32
    prec = "ieee" if lo.dtype == torch.float32 or upcast else "tf32"
    grid = (B * Hkv, triton.cdiv(n, block_n))
    _bound_kernel[grid](q, lo, hi, out, n, Hkv, float(mult),
                        q.stride(0), q.stride(1), lo.stride(0), lo.stride(1), lo.stride(2),
                        hi.stride(0), hi.stride(1), hi.stride(2), out.stride(0), out.stride(1),
                        GP=GP, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                        BLOCK_H=max(16, triton.next_power_of_2(GP)), BLOCK_N=block_n, REDUCE=_RED[reduce],
                        PREC=prec, UPCAST=upcast, num_warps=num_warps)
    return out


def label_scores_triton(qc, codes, scale, zero, r, bits=4, reduce="max", mult=1.0, block_n=512, num_warps=4):
    """label_scores_triton: launch on validated inputs (see ``sparsattn.kernels.unit_scores.label_scores``)."""
    B, Hq, _ = qc.shape
    Hkv, n, RB = codes.shape[1], codes.shape[2], codes.shape[3]
    GP = Hq // Hkv
    qc = qc.float().contiguous()
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    out = _out(B, Hkv, GP, n, reduce, qc.device)
    if n == 0 or B == 0:
        return out
    grid = (B * Hkv, triton.cdiv(n, block_n))
    _label_kernel[grid](qc, codes, scale, zero, out, n, Hkv, float(mult),
                        qc.stride(0), qc.stride(1), codes.stride(0), codes.stride(1), codes.stride(2),
                        scale.stride(0), scale.stride(1), scale.stride(2), zero.stride(0), zero.stride(1),
                        zero.stride(2), out.stride(0), out.stride(1),
                        GP=GP, R=r, RB=RB, BITS=bits,
                        BLOCK_H=max(2, triton.next_power_of_2(GP)), BLOCK_N=block_n, REDUCE=_RED[reduce],
                        num_warps=num_warps)
    return out
