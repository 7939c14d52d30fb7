"""attn_pool Triton kernel: block-max-pooled causal attention map without the T x T matrix.

SeerAttention's distillation target (SeerAttention: Learning Intrinsic Sparse Attention in Your
LLMs, arXiv 2410.13276). One program per (query block, batch x head) makes two passes over the key
blocks at or below the diagonal: pass 1 computes each row's log-sum-exp online (base 2); pass 2
recomputes the scores and stores, per key block, the max over the block's rows and keys of
``exp(s - lse)``. Blocks above the diagonal are written as 0, so every output element is written.
Rows are normalised to sum 1 by the wrapper (a ``[nq, nk]`` division, negligible).
Scores are accumulated in float32; float32 inputs use IEEE products (no TF32) so the target
matches the reference closely; 16-bit inputs use the tensor-core dot.

Only long-standing Triton APIs are used (``tl.dot``, ``tl.exp2``, ``tl.where``, ``tl.max``...)
so the kernel runs on Triton 3.x GPUs and in the CPU interpreter (``TRITON_INTERPRET=1``). The
``triton.jit`` wrapper is built on first use because Triton chooses interpreter vs. compiler when
a function is decorated.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import check_inputs

_KERNELS: dict = {}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run(q: torch.Tensor) -> tuple[bool, str]:
    """can_run: (ok, reason) for the Triton kernel on ``q``'s device."""
    from ..backends import triton_can_run

    return triton_can_run(q)


def _attn_pool_kernel(Q, K, Out,
                      sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                      Hq, Tq, Tk, D, NK, GROUP, scale_log2,
                      BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                      UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)  # 64-bit offsets: batch x head strides can pass 2**31
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    off = Tk - Tq
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Tq
    q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    last_row = tl.minimum(pid_m * BLOCK + BLOCK - 1, Tq - 1)
    n_causal = tl.minimum((last_row + off) // BLOCK + 1, NK)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    for kb in range(0, n_causal):
        cols = kb * BLOCK + tl.arange(0, BLOCK)
        kt = tl.load(k_base + cols[None, :] * skt + dims[:, None] * skd,
                     mask=(cols[None, :] < Tk) & (dims[:, None] < D), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * scale_log2
        ok = (cols[None, :] <= rows[:, None] + off) & (cols[None, :] < Tk)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)

    out_row = Out + pid_bh.to(tl.int64) * (tl.num_programs(0) * NK) + pid_m * NK
    for kb in range(0, n_causal):
        cols = kb * BLOCK + tl.arange(0, BLOCK)
        kt = tl.load(k_base + cols[None, :] * skt + dims[:, None] * skd,
                     mask=(cols[None, :] < Tk) & (dims[:, None] < D), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * scale_log2
        ok = (cols[None, :] <= rows[:, None] + off) & (cols[None, :] < Tk) & row_ok[:, None]
        p = tl.exp2(tl.where(ok, s - lse2[:, None], float("-inf")))
        bm = tl.max(tl.max(p, 1), 0)
        tl.store(out_row + kb, bm)
    for kb in range(n_causal, NK):
        tl.store(out_row + kb, 0.0)


def _kernel():
    key = _interpret()
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit(_attn_pool_kernel)
    return _KERNELS[key]


def attn_pool_triton(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, scale: Optional[float] = None,
                     normalize: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """attn_pool_triton: block-max-pooled causal attention map (SeerAttention, arXiv 2410.13276).

    Same contract as ``attn_pool_reference``: q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``
    (GQA, ``Tk >= Tq``, causal bottom-right aligned) -> float32 ``[B, Hq, nq, nk]``.
    ``out`` (optional, float32 contiguous ``[B, Hq, nq, nk]``) receives the result; every element
    is written (tests poison it with NaN first).
    """
    check_inputs(q, k, block_size, scale)
    ok, why = can_run(q)
    if not ok:
        raise ValueError(f"q.device: the attn_pool Triton kernel cannot run here: {why}")
    if k.dtype != q.dtype:
        raise ValueError(f"k.dtype: expected {q.dtype} (as q), got {k.dtype}")
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    nq, nk = -(-Tq // block_size), -(-Tk // block_size)
    shape = (B, Hq, nq, nk)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous() or out.device != q.device:
        raise ValueError(f"out: expected a contiguous float32 tensor {shape} on {q.device}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_d = max(16, 1 << (D - 1).bit_length())
    grid = (nq, B * Hq)
    # The CPU interpreter mis-computes tl.dot on 16-bit inputs (Triton 3.9): upcast there only.
    interp = _interpret() and q.device.type == "cpu"
    _kernel()[grid](q, k, out, *q.stride(), *k.stride(), Hq, Tq, Tk, D, nk, Hq // Hkv,
                    scale * 1.4426950408889634, BLOCK=block_size, BLOCK_D=block_d,
                    IEEE=q.dtype == torch.float32 or interp, UPCAST=interp and q.dtype != torch.float32,
                    num_warps=4)
    if normalize:
        out.div_(out.sum(-1, keepdim=True).clamp_min(1e-30))
    return out
