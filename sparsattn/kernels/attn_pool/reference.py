"""attn_pool reference: block-max-pooled attention map, plain torch, chunked over query blocks.

SeerAttention's distillation target (SeerAttention: Learning Intrinsic Sparse Attention in Your
LLMs, arXiv 2410.13276): for every query row, the softmax-normalised attention probabilities are
max-pooled inside each key block; the result is max-pooled over the rows of the query block; each
row of the resulting block map is normalised to sum to 1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor


def check_inputs(q: Tensor, k: Tensor, block_size: int, scale: Optional[float]) -> None:
    """Validate q ``[B, Hq, Tq, D]`` / k ``[B, Hkv, Tk, D]``; raise ValueError naming the argument."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, tokens, head_dim], got "
                             f"{getattr(t, 'shape', type(t))}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name}.dtype: expected float16, bfloat16 or float32, got {t.dtype}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected batch {q.shape[0]} and head_dim {q.shape[3]} (as q), got {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k heads: expected a divisor of q's {q.shape[1]} heads, got {k.shape[1]}")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"k tokens: expected >= q tokens ({q.shape[2]}) (causal, bottom-right aligned), got {k.shape[2]}")
    if k.device != q.device:
        raise ValueError(f"k.device: expected {q.device} (as q), got {k.device}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two >= 16, got {block_size!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale: expected None or a positive finite float, got {scale!r}")


def attn_pool_reference(q: Tensor, k: Tensor, *, block_size: int = 64, scale: Optional[float] = None,
                        normalize: bool = True, chunk_blocks: int = 8) -> Tensor:
    """attn_pool_reference: block-max-pooled causal attention map (SeerAttention, arXiv 2410.13276).

    Args:
        q: ``[B, Hq, Tq, D]``; k: ``[B, Hkv, Tk, D]`` with ``Hkv | Hq`` (GQA) and ``Tk >= Tq``
            (causal, bottom-right aligned: row ``i`` sees keys ``j <= i + Tk - Tq``).
        block_size: query and key block size (64 in the paper).
        scale: softmax scale, default ``1/sqrt(D)``.
        normalize: normalise each row of the block map to sum to 1 (the distillation target).
        chunk_blocks: query blocks per chunk (memory ``B*Hq*chunk_blocks*block_size*Tk`` floats).
    Returns:
        float32 ``[B, Hq, ceil(Tq/bs), ceil(Tk/bs)]``; blocks entirely above the diagonal are 0.
    """
    check_inputs(q, k, block_size, scale)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bs = block_size
    nq, nk = -(-Tq // bs), -(-Tk // bs)
    off = Tk - Tq
    kf = k.float().repeat_interleave(Hq // Hkv, dim=1)
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.float32, device=q.device)
    cols = torch.arange(Tk, device=q.device)
    pad_k = nk * bs - Tk
    for qb0 in range(0, nq, chunk_blocks):
        qb1 = min(nq, qb0 + chunk_blocks)
        r0, r1 = qb0 * bs, min(Tq, qb1 * bs)
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale  # [B, Hq, rows, Tk]
        rows = torch.arange(r0, r1, device=q.device)
        allowed = cols[None, :] <= rows[:, None] + off
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.nn.functional.pad(p, (0, pad_k))
        bmax = p.view(B, Hq, r1 - r0, nk, bs).amax(-1)  # per row, per key block
        nrow = (qb1 - qb0) * bs
        bmax = torch.nn.functional.pad(bmax, (0, 0, 0, nrow - (r1 - r0)))  # padded rows are 0 (probs >= 0)
        out[:, :, qb0:qb1] = bmax.view(B, Hq, qb1 - qb0, bs, nk).amax(3)
    if normalize:
        out = out / out.sum(-1, keepdim=True).clamp_min(1e-30)
    return out
