"""s2_attention: S2-Attention's heterogeneous strided context sharding (arXiv 2407.17678)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .. import patterns
from ._common import check_inputs, check_int, check_pow2
from .base import DensityKnob, Method, PresetContext, SelectContext, register


@register("s2_attention")
@dataclass
class S2Attention(Method):
    """S2Attention: each head sees its ``local_blocks`` nearest key blocks plus every
    ``vert_stride``-th block with a head-specific offset, so the heads together cover the whole
    context (S2-Attention / DKernel, arXiv 2407.17678).

    Key block j is visible to query block i of KV head h when ``0 <= i - j < local_blocks`` or
    ``(j + h * head_sliding_step) % vert_stride == 0``. GQA groups share a pattern (the pattern has
    KV heads). ``head_rotation`` chooses the step:

    * ``"query_heads"`` (default, DKernel): ``head_sliding_step = max(1, vert_stride // Hq)`` with
      Hq the number of *query* heads, as ``dkernel/utils.py::get_sparse_attn_mask`` computes it
      (its mask is built per KV head and repeated over the group). For MHA, and whenever
      ``vert_stride <= Hkv``, this equals the rotation over KV heads.
    * ``"kv_heads"``: ``max(1, vert_stride // Hkv)``: the KV heads' shards spread evenly over the
      stride. When ``Hkv < vert_stride`` the heads cannot cover every remote block either way, but
      the largest gap between remote blocks visible to some head becomes ``vert_stride / Hkv``
      instead of ``vert_stride - Hkv + 1`` (8 query / 2 KV heads, stride 8: offsets {0, 4}, gap 4,
      against DKernel's {0, 1}, gap 7). Not the authors' pattern.

    ``homo_head=True`` gives every head offset 0 (one pattern).

    Chunked prefill (``Tq < Tk``): with ``Tk - Tq`` a multiple of ``block_size`` the mask equals
    DKernel's rows for ``past_len = Tk - Tq``; otherwise the query blocks start at the first query
    (DKernel aligns them to absolute positions) and each query block gets the local windows of its
    first and last row, a superset of DKernel's mask by at most one key block per row.

    Defaults: Phi-3-small production config (METHODS.md C4 [code]): block 64, local_blocks=16
    (1024 tokens), vert_stride=8. The architecture's dense layers
    (``dense_attention_every_n_layers=2``) are a layer choice: compose with
    ``masformer(full_layers=..., inner="s2_attention")``. S2 is also a training method; here it is
    the static mask.
    """

    paper = "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (arXiv 2407.17678)"
    demo = True  # shown by `sparsattn demo`
    phase = "prefill"
    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    homo_head: bool = False
    head_rotation: str = "query_heads"
    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> DensityKnob:
        """Preset: local_blocks = max(1, round(target x n_blocks / 4)); knob vert_stride (density falls)."""
        blk = ctx.block_size
        nk = -(-T // blk)
        local = max(1, int(round(target * nk / 4)))
        return DensityKnob(cls.name, "vert_stride", 2, max(2, nk), True, False, max(2.0, 2.0 / target),
                           lambda x: dict(block_size=blk, local_blocks=local, vert_stride=int(x), homo_head=False),
                           lambda x: f"local{local}/stride{int(x)}")


    def __post_init__(self):
        check_pow2("block_size", self.block_size)
        check_int("local_blocks", self.local_blocks, 1)
        check_int("vert_stride", self.vert_stride, 1)
        if not isinstance(self.homo_head, bool):
            raise ValueError(f"homo_head: expected a bool, got {self.homo_head!r}")
        if self.head_rotation not in ("query_heads", "kv_heads"):
            raise ValueError(f"head_rotation: expected 'query_heads' (DKernel) or 'kv_heads', got {self.head_rotation!r}")

    def head_offsets(self, n_query_heads: int, n_kv_heads: int) -> list:
        """Stride offset of each pattern head: ``(h * head_sliding_step) % vert_stride`` per KV head h
        (one head with offset 0 for ``homo_head``); the step follows ``head_rotation``."""
        if self.homo_head:
            return [0]
        n = n_query_heads if self.head_rotation == "query_heads" else n_kv_heads
        step = max(1, self.vert_stride // n)
        return [(h * step) % self.vert_stride for h in range(n_kv_heads)]

    @classmethod
    def small_config(cls) -> dict:
        return {"block_size": 32, "local_blocks": 2, "vert_stride": 3}

    def static_pattern_key(self, layer):
        """Preset: the strided shards depend only on the lengths (and heads)."""
        return ()

    @classmethod
    def full_config(cls, q_len: int) -> dict:
        return {"block_size": 32, "local_blocks": 2, "vert_stride": 1}

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        check_inputs("s2_attention", q, k, ctx)
        Tq, Tk = q.shape[2], k.shape[2]
        if self.local_blocks * self.block_size >= Tk and self.vert_stride > 1:
            warnings.warn(f"s2_attention: local_blocks * block_size = {self.local_blocks * self.block_size} covers the "
                          f"whole context ({Tk} tokens); the pattern is dense", stacklevel=2)
        offsets = self.head_offsets(q.shape[1], k.shape[1])
        bs = self.block_size
        p = patterns.strided_shards(Tq, len(offsets), vert_stride=self.vert_stride, local_blocks=self.local_blocks,
                                    kv_len=Tk, head_offsets=offsets, block_size=bs, causal=True, device=q.device)
        if (Tk - Tq) % bs:
            # strided_shards counts the local window from the diagonal of a query block's first row;
            # when Tk - Tq is not block-aligned the later rows' diagonal lies one block further, so add
            # the window counted from the last row's diagonal too (every query then sees itself).
            nq, nk = -(-Tq // bs), -(-Tk // bs)
            r1 = torch.clamp((torch.arange(nq, device=q.device) + 1) * bs, max=Tq) - 1
            last = (r1 + Tk - Tq) // bs
            kb = torch.arange(nk, device=q.device)
            dist = last[:, None] - kb[None, :]
            local = (dist >= 0) & (dist < self.local_blocks)
            p = p.union(patterns.from_block_mask(local[None, None], block_size=bs, q_len=Tq, kv_len=Tk, causal=True))
        return p
