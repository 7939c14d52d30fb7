"""s2: S2-Attention's strided context sharding across heads, as a trainable layer (arXiv 2407.17678)."""
from __future__ import annotations

import warnings

import torch

from ...methods import get_method
from ..base import attend, pattern_cost, register_layer
from ._qkv import QKVLayer


@register_layer("s2")
class S2Attention(QKVLayer):
    """S2Attention: each head attends to its ``local_blocks`` nearest key blocks plus every
    ``vert_stride``-th block at a head-specific offset, so the heads together cover the context
    (S2-Attention: Hardware-Aware Context Sharding Among Attention Heads, arXiv 2407.17678).

    The pattern is the library's ``s2_attention`` method (``sparsattn.methods.s2_attention``, built
    on ``patterns.strided_shards``; DKernel's head rotation), computed once per length and run
    through ``sparsattn.attention`` (the block-sparse kernel forward and backward). Causal only.

    Defaults: Phi-3-small's production configuration (METHODS.md C4): block 64, ``local_blocks=16``
    (1024 tokens), ``vert_stride=8``, heterogeneous heads. Below 1024 tokens that pattern is dense;
    the MQAR / ListOps presets shrink it (block 16, 2 local blocks, stride 4). The hybrid
    architecture (dense every 2nd layer) is ``masformer(inner="s2")``.
    """

    paper = "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (arXiv 2407.17678)"
    kind = "sparse"
    causal_modes = (True,)
    presets = {"mqar": {"block_size": 16, "local_blocks": 2, "vert_stride": 4},
               "listops": {"block_size": 16, "local_blocks": 2, "vert_stride": 4}}

    def __init__(self, dim: int, heads: int, causal: bool = True, block_size: int = 64, local_blocks: int = 16,
                 vert_stride: int = 8, homo_head: bool = False, bias: bool = False):
        super().__init__()
        self._init_qkv(dim, heads, causal, bias)
        # the method validates block_size (power of two), local_blocks, vert_stride, homo_head
        self.method = get_method("s2_attention", block_size=block_size, local_blocks=local_blocks,
                                 vert_stride=vert_stride, homo_head=homo_head)
        self._pat: dict = {}

    def pattern(self, T: int, device):
        """The S2 ``BlockPattern`` for ``T`` tokens (cached per length and device)."""
        key = (T, str(device))
        if key not in self._pat:
            probe = torch.empty(1, self.heads, T, 1, device=device)
            with warnings.catch_warnings():  # short sequences: the local window may cover everything
                warnings.simplefilter("ignore")
                self._pat = {key: self.method.select(probe, probe)}
        return self._pat[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """S2 attention of ``x [B, T, dim]``."""
        self.check_x(x)
        q, k, v = self.split(x)
        return self.merge(attend(q, k, v, self.pattern(x.shape[1], x.device), causal=True))

    def cost(self, T: int) -> dict:
        """Density and FLOPs of the S2 pattern at ``T`` tokens."""
        return pattern_cost(self.pattern(T, "cpu"), self.heads, self.head_dim)
