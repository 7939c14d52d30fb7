"""lightning: decayed causal linear attention, intra-block dense / inter-block recurrent
(TransNormerLLM, arXiv 2307.14995; Lightning Attention-2, arXiv 2401.04658).

``lightning_attention(q, k, v, log_decay, scale=None, backend=None)`` runs the Triton kernel
(forward + chunked backward) where the shared rule of ``sparsattn.kernels.backends`` allows it
(CUDA, or the CPU with ``TRITON_INTERPRET=1``) and the vectorised chunked torch form elsewhere. ``reference.py`` holds the quadratic masked-decay form and the step
recurrence the kernel is tested against.

The fla-core package (0.6.0) offers the same operator as ``chunk_simple_gla(q, k, v,
g_gamma=log_decay)`` (its ``chunk_lightning_attn`` wraps it with TransNormerLLM's per-layer
slopes); it is not used here because its autotuned kernels need a GPU driver and cannot be checked
in the CPU interpreter our tests run in. ``tests/kernels/test_lightning.py`` compares the two on a
GPU when fla is installed.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import check_inputs, lightning_chunked, lightning_quadratic, lightning_recurrent
from .. import backends as _backends
from .triton import can_run, lightning_attention_triton

__all__ = ["lightning_attention", "lightning_attention_triton", "lightning_chunked", "lightning_quadratic",
           "lightning_recurrent", "can_run", "check_inputs"]


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                        scale: Optional[float] = None, backend: Optional[str] = None,
                        block: int = 64) -> torch.Tensor:
    """lightning_attention: ``o_t = sum_{s<=t} lambda^(t-s) (scale q_t.k_s) v_s`` (Lightning
    Attention-2, arXiv 2401.04658), ``[B, H, T, E]`` in q's dtype.

    ``backend``: None (Triton where it can run, see ``kernels.backends``, else the chunked torch form), ``"triton"`` (CUDA or the CPU
    interpreter) or ``"torch"`` (chunked torch, autograd). ``block``: tokens per tile (64 as in
    the paper's kernel).
    """
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend: expected None, 'triton' or 'torch', got {backend!r}")
    backend = _backends.choose("lightning", q, backend)
    if backend == "triton":
        return lightning_attention_triton(q, k, v, log_decay, scale=scale, block=block)
    return lightning_chunked(q, k, v, log_decay, scale=scale, chunk=block)
