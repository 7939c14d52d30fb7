"""attn_pool: block-max-pooled attention map, SeerAttention's distillation target
(SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs, arXiv 2410.13276).

``attn_pool(q, k, block_size=64, backend=None)`` runs the Triton kernel where the shared rule of
``sparsattn.kernels.backends`` allows it (CUDA, or the CPU with ``TRITON_INTERPRET=1``) and the
chunked torch reference elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import attn_pool_reference
from .. import backends as _backends
from .triton import attn_pool_triton, can_run

__all__ = ["attn_pool", "attn_pool_reference", "attn_pool_triton", "can_run"]


def attn_pool(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, scale: Optional[float] = None,
              normalize: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """attn_pool: float32 ``[B, Hq, ceil(Tq/bs), ceil(Tk/bs)]`` block-max-pooled causal attention map.

    ``backend``: None (Triton where it can run, see ``kernels.backends``, else the reference),
    ``"triton"`` (CUDA, or the CPU interpreter) or ``"reference"``.
    """
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend: expected None, 'triton' or 'reference', got {backend!r}")
    backend = _backends.choose("attn_pool", q, backend)
    if backend == "triton":
        return attn_pool_triton(q, k, block_size=block_size, scale=scale, normalize=normalize)
    return attn_pool_reference(q, k, block_size=block_size, scale=scale, normalize=normalize)
