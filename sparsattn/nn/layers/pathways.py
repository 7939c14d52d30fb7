"""pathways: Stochastically Subsampled self-Attention (The Information Pathways Hypothesis, arXiv 2306.01705)."""
from __future__ import annotations

from typing import Optional

import torch

from ... import patterns
from ..base import attend, pattern_cost, register_layer
from ._qkv import QKVLayer, check_float, check_int, check_pow2


@register_layer("pathways")
class PathwaysAttention(QKVLayer):
    """PathwaysAttention: stochastically subsampled attention in training, full (or a self-ensemble
    of subsampled passes) at inference (The Information Pathways Hypothesis: Transformers are
    Dynamic Self-Ensembles, SSA, arXiv 2306.01705).

    Training: for every sequence and query block of ``block_size`` tokens, the ``local_blocks``
    nearest key blocks are always kept (so every query sees itself) and every other key block at
    distance ``d`` blocks is kept with probability ``p(d) ~ d**-locality``, scaled so that on
    average ``1 / subsample`` of them are kept (``locality = 0``: uniform subsampling; > 0: the
    paper's locally biased sampling). The sampled pattern runs through ``sparsattn.attention``.
    Inference (``eval()``): ``inference="full"`` is dense attention; ``"ensemble"`` averages
    ``ensemble_size`` subsampled passes of this layer.

    Defaults: ``subsample=4`` (the paper saves 4-8x of attention in training), uniform sampling.
    Differences from the paper (whose code was not released, METHODS.md C8): sampling is per key
    block, not per token, so the subsampled attention stays block-sparse; the ensemble is formed
    per layer (mean of the layer's outputs), the paper averages the predictions of whole
    subsampled models.
    """

    paper = "The Information Pathways Hypothesis: Transformers are Dynamic Self-Ensembles (SSA, arXiv 2306.01705)"
    kind = "sparse"
    content_based = False
    presets = {"mqar": {"block_size": 16}, "listops": {"block_size": 16}}

    def __init__(self, dim: int, heads: int, causal: bool = True, subsample: float = 4.0, locality: float = 0.0,
                 block_size: int = 64, local_blocks: int = 1, inference: str = "full", ensemble_size: int = 4,
                 bias: bool = False):
        super().__init__()
        self._init_qkv(dim, heads, causal, bias)
        self.subsample = check_float("subsample", subsample, 1.0)
        self.locality = check_float("locality", locality, 0.0)
        self.block_size = check_pow2("block_size", block_size)
        self.local_blocks = check_int("local_blocks", local_blocks, 1)
        if inference not in ("full", "ensemble"):
            raise ValueError(f"inference: expected 'full' or 'ensemble', got {inference!r}")
        self.inference = inference
        self.ensemble_size = check_int("ensemble_size", ensemble_size, 1)

    def sample_pattern(self, batch: int, T: int, device, generator: Optional[torch.Generator] = None):
        """A subsampled ``BlockPattern`` (batch ``batch``, one head) for ``T`` tokens."""
        bs = self.block_size
        n = -(-T // bs)
        qi = torch.arange(n, device=device)[:, None]
        kj = torch.arange(n, device=device)[None, :]
        d = (qi - kj) if self.causal else (qi - kj).abs()
        avail = d >= self.local_blocks  # (causal: blocks above the diagonal have d < 0)
        w = torch.where(avail, (d - self.local_blocks + 1).clamp_min(1).double() ** -self.locality,
                        torch.zeros((), dtype=torch.float64, device=device))
        n_avail = avail.sum(1, keepdim=True).double()
        p = (w * (n_avail / self.subsample) / w.sum(1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
        u = torch.rand((batch, n, n), generator=generator, dtype=torch.float64,
                       device="cpu" if generator is not None else device).to(device)
        keep = (u < p) & avail
        local = (d >= 0) & (d < self.local_blocks)
        mask = (keep | local)[:, None]
        return patterns.from_block_mask(mask, block_size=bs, q_len=T, causal=self.causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsampled attention (training), full or ensembled attention (eval) of ``x [B, T, dim]``."""
        self.check_x(x)
        q, k, v = self.split(x)
        B, T = x.shape[0], x.shape[1]
        if not self.training and self.inference == "full":
            return self.merge(attend(q, k, v, causal=self.causal))
        n = 1 if self.training else self.ensemble_size
        out = 0
        for _ in range(n):
            out = out + attend(q, k, v, self.sample_pattern(B, T, x.device), causal=self.causal)
        return self.merge(out / n)

    def cost(self, T: int) -> dict:
        """Inference cost (dense for ``inference="full"``) and ``train_density`` of the sampled
        patterns (mean of 8 draws with a fixed generator)."""
        g = torch.Generator().manual_seed(0)
        p = self.sample_pattern(8, T, "cpu", generator=g)
        tr = pattern_cost(p, self.heads, self.head_dim)
        if self.inference == "full":
            dense = super().cost(T)
            return {**dense, "train_density": tr["density"]}
        return {"density": tr["density"], "flops": tr["flops"] * self.ensemble_size, "train_density": tr["density"]}
