"""Lightning attention Triton kernel: decayed causal linear attention, intra-block dense /
inter-block recurrent (Lightning Attention-2, arXiv 2401.04658; TransNormerLLM, arXiv 2307.14995).

One program per (batch x head, block of value columns) walks the sequence in blocks of ``BLOCK``
tokens and keeps the recurrent state ``S [D, E_block]`` in registers (float32):

* intra: ``O_c = [(scale Q_c K_c^T) * M] V_c``, ``M_ij = lambda^(i-j)`` for ``i >= j``;
* inter: ``O_c += (lambda^(i+1) * scale Q_c) S``;
* update: ``S = lambda^BLOCK S + (lambda^(BLOCK-1-j) K_c)^T V_c``.

Output columns are independent in linear attention, so value columns are split across programs
(the grid's second axis) for parallelism. Every decay factor is ``exp(log_decay * d)`` with
``d >= 0``, so factors lie in (0, 1] and never overflow (bf16 inputs on long sequences are safe).

The backward pass is three more launches of the same forward kernel (``LightningFn``):
``dq = fwd(do, v, k)``; ``dk`` and ``dv`` are the same kernel run over the reversed sequence
(``REVERSE``: position ``t`` is read at ``T - 1 - t``, no copy): ``dk = fwd_rev(v, do, q)``,
``dv = fwd_rev(k, q, do)``. So the backward is chunked too and never builds a T x T matrix.
``log_decay`` receives no gradient here (the decay is a fixed per-head rate, as in the papers).

Only long-standing Triton APIs are used; the kernel runs on Triton 3.x GPUs and in the CPU
interpreter (``TRITON_INTERPRET=1``, where 16-bit inputs are upcast to float32 because the
interpreter mis-computes 16-bit ``tl.dot``). The ``triton.jit`` wrapper is built on first use
because Triton chooses interpreter vs. compiler when a function is decorated.
"""
from __future__ import annotations

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
    """can_run: (ok, reason) for the Lightning Triton kernel on ``q``'s device."""
    from ..backends import triton_can_run

    return triton_can_run(q)


def _lightning_fwd_kernel(Q, K, V, O, G, H, T, DK, DV, scale,
                          BLOCK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
                          REVERSE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_e = tl.program_id(1)
    h = pid_bh % H
    base_qk = pid_bh.to(tl.int64) * T * DK  # contiguous [B*H, T, DK]
    base_v = pid_bh.to(tl.int64) * T * DV  # contiguous [B*H, T, DV]
    g = tl.load(G + h).to(tl.float32)
    i = tl.arange(0, BLOCK)
    dk = tl.arange(0, BD)
    de = pid_e * BE + tl.arange(0, BE)
    dk_ok = dk < DK
    de_ok = de < DV
    diff = i[:, None] - i[None, :]
    m = tl.where(diff >= 0, tl.exp(g * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    q_decay = tl.exp(g * (i + 1).to(tl.float32))
    k_decay = tl.exp(g * (BLOCK - 1 - i).to(tl.float32))
    blk_decay = tl.exp(g * BLOCK)
    state = tl.zeros([BD, BE], dtype=tl.float32)
    for c in range(0, tl.cdiv(T, BLOCK)):
        t = c * BLOCK + i
        ok = t < T
        if REVERSE:
            pos = T - 1 - t
        else:
            pos = t
        pos = pos.to(tl.int64)
        q = tl.load(Q + base_qk + pos[:, None] * DK + dk[None, :], mask=ok[:, None] & dk_ok[None, :], other=0.0)
        k = tl.load(K + base_qk + pos[:, None] * DK + dk[None, :], mask=ok[:, None] & dk_ok[None, :], other=0.0)
        v = tl.load(V + base_v + pos[:, None] * DV + de[None, :], mask=ok[:, None] & de_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dt = v.dtype
        qs = (q.to(tl.float32) * scale).to(dt)
        if IEEE:
            s = tl.dot(qs, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(qs, tl.trans(k))
        s = s * m
        qd = (q.to(tl.float32) * (q_decay * scale)[:, None]).to(dt)
        kd = (k.to(tl.float32) * k_decay[:, None]).to(dt)
        if IEEE:
            o = tl.dot(s.to(dt), v, input_precision="ieee")
            o += tl.dot(qd, state.to(dt), input_precision="ieee")
            state = state * blk_decay + tl.dot(tl.trans(kd), v, input_precision="ieee")
        else:
            o = tl.dot(s.to(dt), v)
            o += tl.dot(qd, state.to(dt))
            state = state * blk_decay + tl.dot(tl.trans(kd), v)
        tl.store(O + base_v + pos[:, None] * DV + de[None, :], o.to(O.dtype.element_ty),
                 mask=ok[:, None] & de_ok[None, :])


def _kernel():
    key = _interpret()
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit(_lightning_fwd_kernel)
    return _KERNELS[key]


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
            block: int, reverse: bool) -> torch.Tensor:
    """One forward launch on contiguous q/k ``[B, H, T, DK]``, v ``[B, H, T, DV]``."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    out = torch.empty(B, H, T, DV, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    be = min(64, _pow2(DV))
    interp = _interpret() and q.device.type == "cpu"
    ieee = q.dtype in (torch.float32, torch.float64) or interp
    grid = (B * H, triton.cdiv(DV, be))
    _kernel()[grid](q, k, v, out, g, H, T, DK, DV, float(scale), BLOCK=block, BD=_pow2(DK), BE=be,
                    REVERSE=reverse, IEEE=ieee, UPCAST=interp and q.dtype in (torch.float16, torch.bfloat16),
                    num_warps=4)
    return out


class LightningFn(torch.autograd.Function):
    """Autograd function: the forward kernel, and a backward made of three chunked launches."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, block):
        """Forward launch; saves q, k, v for the chunked backward."""
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        ctx.save_for_backward(q, k, v, g)
        ctx.scale, ctx.block = scale, block
        return _launch(q, k, v, g, scale, block, False)

    @staticmethod
    def backward(ctx, do):
        """dq = fwd(do, v, k); dk = fwd_rev(v, do, q); dv = fwd_rev(k, q, do) (all scaled)."""
        q, k, v, g = ctx.saved_tensors
        do = do.contiguous()
        sc, bl = ctx.scale, ctx.block
        dq = _launch(do, v, k, g, sc, bl, False) if ctx.needs_input_grad[0] else None
        dk = _launch(v, do, q, g, sc, bl, True) if ctx.needs_input_grad[1] else None
        dv = _launch(k, q, do, g, sc, bl, True) if ctx.needs_input_grad[2] else None
        return dq, dk, dv, None, None, None


def lightning_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                               scale: Optional[float] = None, block: int = 64) -> torch.Tensor:
    """lightning_attention_triton: decayed causal linear attention, Triton kernel with a chunked
    backward (Lightning Attention-2, arXiv 2401.04658).

    q, k ``[B, H, T, D]``, v ``[B, H, T, E]`` (fp16/bf16/fp32; fp64 in the interpreter),
    ``log_decay [H]`` (<= 0), ``scale`` (default ``D ** -0.5``), ``block`` tokens per tile
    (a power of two >= 16; the paper's kernel uses 64). Returns ``[B, H, T, E]`` in q's dtype.
    """
    check_inputs(q, k, v, log_decay)
    ok, why = can_run(q)
    if not ok:
        raise ValueError(f"q.device: the Lightning Triton kernel cannot run here: {why}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block: expected a power of two >= 16, got {block!r}")
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        raise ValueError(f"q/v: head dims up to 256 are supported, got D={q.shape[-1]}, E={v.shape[-1]}")
    if q.dtype == torch.float64 and q.device.type == "cuda":
        raise ValueError("q.dtype: float64 runs in the interpreter only; use float32/bf16/fp16 on CUDA")
    sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
    g = log_decay.detach().to(torch.float32).contiguous()
    return LightningFn.apply(q, k, v, g, sc, block)
