"""dense: exact softmax attention (Attention Is All You Need, arXiv 1706.03762), the reference layer."""
from __future__ import annotations

import torch

from ..base import attend, register_layer
from ._qkv import QKVLayer


@register_layer("dense")
class DenseAttention(QKVLayer):
    """DenseAttention: exact multi-head softmax attention through ``sparsattn.attention``
    (Attention Is All You Need, arXiv 1706.03762), the baseline every sparse layer is measured
    against with the same harness.

    ``x [B, T, dim] -> [B, T, dim]``; q/k/v and output projections (no bias by default), causal or
    not. Density 1.
    """

    paper = "Attention Is All You Need (arXiv 1706.03762)"
    kind = "sparse"

    def __init__(self, dim: int, heads: int, causal: bool = True, bias: bool = False):
        super().__init__()
        self._init_qkv(dim, heads, causal, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact attention of ``x [B, T, dim]``."""
        self.check_x(x)
        q, k, v = self.split(x)
        return self.merge(attend(q, k, v, causal=self.causal))
