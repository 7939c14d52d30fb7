"""Estimate: cheap scoring helpers shared by prefill methods (plain torch reference).

* ``pool_blocks``: mean / max pooling of q or k over fixed-size token blocks (ragged tail aware).
* ``block_scores``: pooled ``q̄ k̄ᵀ`` block scores with the causal block mask (MInference block-sparse).
* ``last_q_attention``: softmax attention of the last ``last_q`` queries on every key, O(last_q·N).
* ``vertical_slash_scores``: column sums and diagonal sums of that estimate (MInference VS).
* ``exact_block_scores``: block-max / block-sum of the exact attention probabilities, computed one
  chunk of query blocks at a time (O(chunk·N) memory per head): the oracle.
* ``topk_mask`` / ``topk_indices``: top-k along the last dim ignoring ``-inf`` entries.
* ``group_query_heads``: view ``q [B, Hq, T, D]`` as ``[B, Hkv, G, T, D]`` for GQA scoring.

A Triton version of the vertical/slash estimate (two streaming passes, no ``[B, Hq, last_q, Tk]``
tensor) is ``sparsattn.kernels.estimate.triton.vertical_slash_scores_triton`` (CUDA, or CPU with
``TRITON_INTERPRET=1``; tested against the reference in interpret mode).

Every function takes tensors in the public layout ``[batch, heads, tokens, head_dim]`` and
returns float32 scores; query heads are scored against their GQA key head without repeating K.
"""
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
    vertical_slash_scores,
)

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
