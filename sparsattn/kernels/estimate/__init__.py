"""Estimate: cheap scoring helpers shared by prefill methods (plain torch reference).

* ``pool_blocks``: mean / max pooling of q or k over fixed-size token blocks (ragged tail aware).
* ``block_scores``: pooled ``q̄ k̄ᵀ`` block scores with the causal block mask (MInference block-sparse).
* ``last_q_attention``: softmax attention of the last ``last_q`` queries on every key, O(last_q·N).
* ``vertical_slash_scores``: column sums and diagonal sums of that estimate (MInference VS).
* ``exact_block_scores``: block-max / block-sum of the exact attention probabilities, computed one
  chunk of query blocks at a time (O(chunk·N) memory per head): the oracle.
* ``topk_mask`` / ``topk_indices``: top-k along the last dim ignoring ``-inf`` entries.
* ``group_query_heads``: view ``q [B, Hq, T, D]`` as ``[B, Hkv, G, T, D]`` for GQA scoring.

``vertical_slash_scores`` dispatches through ``sparsattn.kernels.backends`` (family ``estimate``):
the Triton version (two streaming passes, no ``[B, Hq, last_q, Tk]`` tensor,
``triton.vertical_slash_scores_triton``) where Triton can run -- CUDA, or the CPU with
``TRITON_INTERPRET=1`` -- and the torch reference elsewhere or when ``probs`` is given.

Every function takes tensors in the public layout ``[batch, heads, tokens, head_dim]`` and
returns float32 scores; query heads are scored against their GQA key head without repeating K.
"""
from typing import Optional

import torch

from .. import backends as _backends
from . import reference as _ref
from .reference import (
    block_scores,
    causal_block_mask,
    diagonal_block,
    exact_block_scores,
    group_query_heads,
    last_q_attention,
    pool_blocks,
    topk_indices,
    topk_mask,
)


def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, last_q: int = 64, *, scale: Optional[float] = None,
                          probs: Optional[torch.Tensor] = None, backend: Optional[str] = None):
    """vertical_slash_scores: MInference's last-q vertical/slash estimate (MInference 1.0, arXiv 2407.02490).

    Same contract as ``reference.vertical_slash_scores`` (float32 ``(vertical, slash)`` ``[B, Hq, Tk]``);
    ``backend``: None (the ``estimate`` row of ``kernels.backends``: Triton on CUDA or in the interpreter,
    else the reference), ``"triton"`` or ``"reference"``.
    """
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend: expected None, 'triton' or 'reference', got {backend!r}")
    qt = q.shape[-2] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    kt = k.shape[-2] if isinstance(k, torch.Tensor) and k.dim() == 4 else None
    if isinstance(q, torch.Tensor) and _backends.choose("estimate", q, backend, q_len=qt, kv_len=kt,
                                                        probs=probs is not None) == "triton":
        from .triton import vertical_slash_scores_triton

        return vertical_slash_scores_triton(q, k, last_q, scale=scale)
    return _ref.vertical_slash_scores(q, k, last_q, scale=scale, probs=probs)

__all__ = [
    "block_scores",
    "causal_block_mask",
    "diagonal_block",
    "exact_block_scores",
    "group_query_heads",
    "last_q_attention",
    "pool_blocks",
    "topk_indices",
    "topk_mask",
    "vertical_slash_scores",
]
