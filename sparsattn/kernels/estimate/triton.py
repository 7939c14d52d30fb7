"""Estimate, Triton: MInference's last-q vertical/slash scores without materialising the
``[B, Hq, last_q, Tk]`` attention estimate (two streaming passes over the keys).

``vertical_slash_scores_triton(q, k, last_q, scale)`` returns the same ``(vertical, slash)`` as
``reference.vertical_slash_scores`` (float32 ``[B, Hq, Tk]`` each). Runs on CUDA, or on the CPU
with ``TRITON_INTERPRET=1`` (tests compare it with the torch reference there).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _lastq_lse_kernel(Q, K, LSE, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                      Hq, G, Tq, Tk, lq, scale,
                      LQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // Hq
    h = bh % Hq
    r = tl.arange(0, LQ)
    d = tl.arange(0, BLOCK_D)
    row = Tq - lq + r
    q = tl.load(Q + b * stride_qb + h * stride_qh + row[:, None] * stride_qt + d[None, :],
                mask=(r[:, None] < lq) & (d[None, :] < D), other=0.0).to(tl.float32)
    pos = row + (Tk - Tq)
    m = tl.full([LQ], float("-inf"), tl.float32)
    l = tl.zeros([LQ], tl.float32)
    kbase = K + b * stride_kb + (h // G) * stride_kh
    for n0 in range(0, Tk, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(kbase + j[None, :] * stride_kt + d[:, None], mask=(j[None, :] < Tk) & (d[:, None] < D),
                     other=0.0).to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee") * scale
        ok = (j[None, :] <= pos[:, None]) & (j[None, :] < Tk)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
    lse = tl.where(l > 0, tl.log(l) + tl.where(m == float("-inf"), 0.0, m), float("inf"))
    tl.store(LSE + bh * LQ + r, lse, mask=r < lq)


@triton.jit
def _lastq_vs_kernel(Q, K, LSE, VERT, SLASH, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     Hq, G, Tq, Tk, lq, scale,
                     LQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    nt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    r = tl.arange(0, LQ)
    d = tl.arange(0, BLOCK_D)
    row = Tq - lq + r
    q = tl.load(Q + b * stride_qb + h * stride_qh + row[:, None] * stride_qt + d[None, :],
                mask=(r[:, None] < lq) & (d[None, :] < D), other=0.0).to(tl.float32)
    pos = row + (Tk - Tq)
    lse = tl.load(LSE + bh * LQ + r, mask=r < lq, other=float("inf"))
    j = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    kt = tl.load(K + b * stride_kb + (h // G) * stride_kh + j[None, :] * stride_kt + d[:, None],
                 mask=(j[None, :] < Tk) & (d[:, None] < D), other=0.0).to(tl.float32)
    s = tl.dot(q, kt, input_precision="ieee") * scale
    ok = (j[None, :] <= pos[:, None]) & (j[None, :] < Tk) & (r[:, None] < lq)
    p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
    tl.store(VERT + bh * Tk + j, tl.sum(p, 0), mask=j < Tk)
    dd = pos[:, None] - j[None, :]
    tl.atomic_add(SLASH + bh * Tk + dd, p, mask=ok & (dd >= 0))


def vertical_slash_scores_triton(q: torch.Tensor, k: torch.Tensor, last_q: int = 64, *,
                                 scale: Optional[float] = None, block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """vertical_slash_scores_triton: Triton version of ``reference.vertical_slash_scores``
    (q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, ``Tq <= Tk``); memory O(B·Hq·Tk) outputs only."""
    from .reference import _check_qk

    B, Hq, Hkv, Tq, Tk, D = _check_qk(q, k)
    if not isinstance(last_q, int) or last_q < 1:
        raise ValueError(f"last_q: expected an int >= 1, got {last_q!r}")
    if Tq > Tk:
        raise ValueError(f"q tokens: expected at most k's {Tk}, got {Tq}")
    lq = min(last_q, Tq)
    LQ = max(16, triton.next_power_of_2(lq))
    BD = max(16, triton.next_power_of_2(D))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    lse = torch.empty(B * Hq, LQ, dtype=torch.float32, device=q.device)
    vert = torch.empty(B, Hq, Tk, dtype=torch.float32, device=q.device)
    slash = torch.zeros(B, Hq, Tk, dtype=torch.float32, device=q.device)
    args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), Hq, Hq // Hkv, Tq, Tk, lq, scale)
    _lastq_lse_kernel[(B * Hq,)](q, k, lse, *args, LQ=LQ, BLOCK_N=block_n, BLOCK_D=BD, D=D)
    _lastq_vs_kernel[(triton.cdiv(Tk, block_n), B * Hq)](q, k, lse, vert, slash, *args, LQ=LQ, BLOCK_N=block_n,
                                                          BLOCK_D=BD, D=D)
    return vert, slash
