"""FlexAttention backend: the same pattern through ``torch.nn.attention.flex_attention`` (compiled).

Serves as a second backend and as the baseline the Triton kernel is measured against. The
``BlockMask`` is built once per pattern and cached on it; the compiled function is built once.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...patterns import BlockPattern

_COMPILED = None


def compiled_flex():
    """The process-wide ``torch.compile``d ``flex_attention`` (built on first use)."""
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def flex_block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, *,
                      scale: Optional[float] = None):
    """flex_block_sparse: attention on ``pattern`` via compiled FlexAttention; returns (out, lse).

    ``lse`` is the natural log-sum-exp (float32); rows with no key return zeros (Flex semantics).
    """
    bm = pattern.derived("flex_block_mask", pattern.to_flex_block_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    gqa = q.shape[1] != k.shape[1]
    out, lse = compiled_flex()(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa, return_lse=True)
    return out, lse.float()
