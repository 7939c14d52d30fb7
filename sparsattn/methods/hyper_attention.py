"""hyper_attention: HyperAttention as a training-free drop-in for a pretrained model's prefill
(HyperAttention: Long-context Attention in Near-Linear Time, arXiv 2310.05869).

Not a mask: the method computes attention itself through ``attend`` (the method contract's form for
approximations), by calling the ``hyper`` mixer's core ``sparsattn.nn.mixers.hyper.hyper_attention``
(no second copy of the math). The paper swaps it into the final layers of a pretrained model
(``sparsattn.patch(model, method={l: "hyper" for l in last_layers})``).

Inside a model: GQA key/value heads are repeated for their query groups; the LSH hyperplanes are
drawn from ``seed`` and the residual sample from a generator seeded with ``(seed, layer)`` at every
call, so a forward is deterministic. A chunk of queries shorter than the keys (chunked prefill with
a cache, ``Tq < Tk``) is computed exactly (the recursion is defined for square causal attention);
decode runs dense, as for every prefill method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..nn.mixers._approx_common import repeat_kv
from ..nn.mixers._approx_lsh import lsh_projections
from ..nn.mixers.hyper import check_hyper_config, hyper_attention
from .base import Method, SelectContext, register


@register("hyper")
@dataclass
class HyperAttentionMethod(Method):
    """HyperAttention: sortLSH block-diagonal + sampled residual prefill attention (arXiv 2310.05869).

    Fields are the authors' defaults; with ``min_seq_len >= T`` or ``block_size >= T`` it is exact
    attention.
    """

    paper = "HyperAttention: Long-context Attention in Near-Linear Time (arXiv 2310.05869)"
    phase = "prefill"

    lsh_num_projs: int = 7
    block_size: int = 256
    sample_size: int = 256
    min_seq_len: int = 4096
    seed: int = 0
    _proj: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        check_hyper_config(self.lsh_num_projs, self.block_size, self.sample_size, self.min_seq_len)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")

    def _hyperplanes(self, D: int, device) -> torch.Tensor:
        key = (D, str(device))
        if key not in self._proj:
            self._proj[key] = lsh_projections(D, self.lsh_num_projs, self.seed, device)
        return self._proj[key]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Optional[SelectContext] = None,
               stats: Optional[dict] = None):
        """``(out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32)`` of causal HyperAttention
        of q on k/v ``[B, Hkv, Tk, D]`` (GQA heads repeated). ``stats`` as in ``hyper_attention``."""
        ctx = ctx if ctx is not None else SelectContext()
        Hq, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
        if not ctx.causal:
            raise ValueError("ctx.causal: the hyper method is a causal prefill method (got causal=False)")
        if Tq != Tk:  # chunked prefill: exact (bottom-right aligned causal)
            from ..api import attention

            return attention(q, k, v, causal=True, scale=ctx.scale, return_lse=True)
        gen = torch.Generator(device=q.device).manual_seed(self.seed * 1_000_003 + (ctx.layer or 0))
        return hyper_attention(q, repeat_kv(k, Hq), repeat_kv(v, Hq), proj=self._hyperplanes(q.shape[-1], q.device),
                               causal=True, scale=ctx.scale, block_size=self.block_size, sample_size=self.sample_size,
                               min_seq_len=self.min_seq_len, generator=gen, stats=stats)

    @classmethod
    def swap_configs(cls) -> dict:
        """Preset: the settings swapped into the bundled model's last layers (docs/approximations.md):
        ``min_seq_len/block_size/sample_size`` 1024/256/256 and 512/128/128."""
        return {"hyper-1024/256/256": {"min_seq_len": 1024, "block_size": 256, "sample_size": 256},
                "hyper-512/128/128": {"min_seq_len": 512, "block_size": 128, "sample_size": 128}}

    @classmethod
    def small_config(cls) -> dict:
        """Small sizes for the registry-wide tests (T = 200..600)."""
        return {"block_size": 32, "sample_size": 16, "min_seq_len": 64}

    @classmethod
    def full_config(cls, q_len: int) -> dict:
        """Every causal pair kept: the whole sequence is one exact leaf."""
        return {"min_seq_len": max(int(q_len), 1)}
