"""oracle_topk: the true top-k key blocks per query block from exact attention (upper bound)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import patterns
from ..kernels import estimate
from ._common import check_inputs, check_int, check_pow2, clamp_budget
from .base import DensityKnob, Method, PresetContext, SelectContext, register


@register("oracle_topk")
@dataclass
class OracleTopK(Method):
    """OracleTopK: keep, per (head, query block), the key blocks that hold the most exact attention
    (oracle upper bound of block-sparse selection, as used in MInference, arXiv 2407.02490).

    Scores are the block-max (``reduce="max"``) or block-sum (``"sum"``) of the exact softmax
    probabilities, computed one chunk of query blocks at a time (memory O(block_q·N) per head,
    time O(N²): an oracle, not a fast method). The diagonal block(s) of every query block are
    always kept and counted in the budget; when ``Tk - Tq`` is not a multiple of the block size a
    query block's diagonal crosses two key blocks, and both are kept even where the budget is one
    block (so every row keeps its own key). Pattern heads = query heads.

    Args:
        block_size: block size in tokens (query and key), default 64.
        top_k: key blocks per query block; when given it overrides ``density``.
        density: fraction of each query block's causal key blocks to keep (ceil, >= 1), default 0.1.
        reduce: "max" or "sum" block score.
    """

    paper = "Oracle top-k block attention (upper bound used by MInference, arXiv 2407.02490)"
    phase = "prefill"
    block_size: int = 64
    top_k: Optional[int] = None
    density: Optional[float] = 0.1
    reduce: str = "max"
    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> DensityKnob:
        """Preset: knob density (block ``ctx.block_size``, block-max scores)."""
        blk = ctx.block_size
        return DensityKnob(cls.name, "density", 1e-3, 1.0, False, True, target,
                           lambda x: dict(block_size=blk, top_k=None, density=round(float(x), 5), reduce="max"),
                           lambda x: f"d{float(x):.3f}")

    @classmethod
    def density_variants(cls, T: int, target: float, ctx: PresetContext) -> dict:
        """Preset: ``uniform``: the same number of key blocks in every query-block row (SeerAttention's
        top-k allocation, the oracle it is distilled from), knob ``top_k`` (guess: ``target x`` half the
        key blocks, the causal mean)."""
        blk = ctx.block_size
        nk = -(-T // blk)
        return {"uniform": DensityKnob(cls.name, "top_k", 1, max(1, nk), True, True, max(1.0, target * (nk + 1) / 2),
                                       lambda x: dict(block_size=blk, top_k=int(x), density=None, reduce="max"),
                                       lambda x: f"top{int(x)} per row")}


    def __post_init__(self):
        check_pow2("block_size", self.block_size)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)
        if self.top_k is None and self.density is None:
            raise ValueError("density: expected a number in (0, 1] when top_k is None, got None")
        if self.density is not None and (isinstance(self.density, bool) or not isinstance(self.density, (int, float))
                                         or not 0 < self.density <= 1):
            raise ValueError(f"density: expected a number in (0, 1], got {self.density!r}")
        if self.reduce not in ("max", "sum"):
            raise ValueError(f"reduce: expected 'max' or 'sum', got {self.reduce!r}")

    @classmethod
    def small_config(cls) -> dict:
        return {"block_size": 32, "density": 0.3}

    @classmethod
    def full_config(cls, q_len: int) -> dict:
        return {"block_size": 32, "top_k": None, "density": 1.0}

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        check_inputs("oracle_topk", q, k, ctx, need_causal=False)
        Tq, Tk = q.shape[2], k.shape[2]
        bs = self.block_size
        s = estimate.exact_block_scores(q, k, bs, bs, scale=ctx.scale, causal=ctx.causal, reduce=self.reduce)
        nq, nk = s.shape[2], s.shape[3]
        dev = q.device
        if ctx.causal:
            allowed = estimate.causal_block_mask(Tq, Tk, bs, bs, dev)  # [nq, nk]
            # diagonal blocks: those holding the diagonal of any row of the query block
            off = Tk - Tq
            r0 = torch.arange(nq, device=dev) * bs
            r1 = torch.clamp(r0 + bs, max=Tq) - 1
            kb = torch.arange(nk, device=dev)
            diag = (kb[None, :] >= ((r0 + off) // bs)[:, None]) & (kb[None, :] <= ((r1 + off) // bs)[:, None])
            diag = diag & allowed
            s = s.masked_fill(diag, float("inf"))
            n_diag = diag.sum(-1)  # [nq]: 1 or 2 (2 when Tk - Tq is not a multiple of the block size)
        else:
            allowed = torch.ones(nq, nk, dtype=torch.bool, device=dev)
            n_diag = torch.zeros(nq, dtype=torch.long, device=dev)
        n_allowed = allowed.sum(-1)  # [nq]
        if self.top_k is not None:
            kk = clamp_budget("oracle_topk", "top_k", self.top_k, nk)
            per_row = torch.clamp(n_allowed, max=kk)
        else:
            kk = nk
            per_row = torch.clamp(torch.ceil(n_allowed.double() * self.density).long(), min=1)
        # the diagonal blocks are never cut by the budget (a query block whose rows straddle two key
        # blocks needs both, or some rows are left without their own key)
        per_row = torch.maximum(per_row, n_diag)
        kk = max(int(kk), int(n_diag.max()) if nq else 0)
        idx, ok = estimate.topk_indices(s, int(kk))
        rank = torch.arange(idx.shape[-1], device=dev)
        ok = ok & (rank[None, :] < per_row[:, None])
        counts = ok.sum(-1).to(torch.int32)
        # valid picks come first in topk order, so counts-prefix == ok
        return patterns.from_topk_blocks(idx, q_len=Tq, kv_len=Tk, block_size=bs, causal=ctx.causal, counts=counts)
