"""recycled_attention: full decode steps now and then, the top-K of the last full step in between."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ._select import decode_inputs, full_pattern, mask_to_pattern, scale_of, valid_units
from .base import Method, PresetContext, SelectContext, register


@register("recycled_attention")
@dataclass
class RecycledAttention(Method):
    """RecycledAttention: alternate full steps with steps over the recycled top-K tokens (Recycled Attention,
    arXiv 2411.05787; RefreshKV, its journal version, same arXiv id).

    A *full step* reads every token and rebuilds the partial cache ``C_p``: the ``budget`` (K) tokens
    with the highest attention probabilities of the step (softmax per query head, the GQA group
    combined by max, then max-pooled over ``pool_kernel`` neighbouring positions, SnapKV-style),
    ranked by that score. A *partial step* reads ``C_p`` plus the current token, then appends the
    current token to ``C_p`` and, when ``|C_p|`` exceeds K, evicts the entry with the lowest score of
    the last full step (RefreshKV, Algorithm 1 lines 5-7: ``C_p`` is kept in ascending score order,
    new tokens go to its end, ``C_p <- C_p[1:]``); once every recycled token is gone the oldest new
    token goes first. So a partial step reads exactly ``min(K, valid) + 1`` tokens. Schedule:
    ``"stride"`` = a full step every ``stride`` steps (original Recycled Attention), or
    ``"similarity"`` = every ``check_every`` steps, a full step when the cosine similarity of the
    head-averaged query with the one of the last full step is below ``similarity`` (RefreshKV).

    Defaults [abs]: stride 10 (ablation S in {10, 15}); check_every 5 (QC in {5, 10}); similarity
    0.85 (Llama-3.1-8B); budget K = ``budget_ratio`` x context = 1/8 of the input, or ``budget``
    tokens when set (K = 2048 / 4096 in the paper). ``pool_kernel`` 7 is SnapKV's (unverified).

    State per layer in ``ctx.state["recycled_attention"][layer]``. ``select(q, k_cache, ctx)``
    returns a TokenPattern (heads Hkv); ``ctx.full_step`` tells whether it was a full step.
    """

    paper = "Recycled Attention: Efficient inference for long-context language models (arXiv 2411.05787)"
    phase = "decode"
    budget: Optional[int] = None
    budget_ratio: float = 0.125
    schedule: str = "stride"
    stride: int = 10
    check_every: int = 5
    similarity: float = 0.85
    pool_kernel: int = 7
    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> dict:
        """Preset: ``budget = B`` (the recycled set read by partial steps)."""
        return {"budget": int(budget_tokens)}


    def __post_init__(self):
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ValueError(f"budget: expected None or an int >= 1, got {self.budget!r}")
        if not isinstance(self.budget_ratio, (int, float)) or not 0 < self.budget_ratio <= 1:
            raise ValueError(f"budget_ratio: expected a number in (0, 1], got {self.budget_ratio!r}")
        if self.schedule not in ("stride", "similarity"):
            raise ValueError(f"schedule: expected 'stride' or 'similarity', got {self.schedule!r}")
        for name in ("stride", "check_every", "pool_kernel"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel: expected an odd int, got {self.pool_kernel!r}")
        if not isinstance(self.similarity, (int, float)) or not -1 <= self.similarity <= 1:
            raise ValueError(f"similarity: expected a number in [-1, 1], got {self.similarity!r}")

    def _is_full(self, st: Optional[dict], q: torch.Tensor) -> bool:
        if st is None:
            return True
        n = st["since"]  # partial steps since the last full step
        if self.schedule == "stride":
            return n + 1 >= self.stride
        if (n + 1) % self.check_every:
            return False
        a = q.float().mean(1)  # head-averaged query [B, D]
        cos = F.cosine_similarity(a, st["q"], dim=-1)
        return bool((cos < self.similarity).any())

    def _rank(self, q, k, kl, ctx):
        """Ranking of a full step: token indices ``[B, Hkv, min(K, T)]`` by descending pooled score, the
        number of valid entries ``[B, Hkv]`` (K, or fewer valid tokens), and the capacity K."""
        B, Hq, D = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        qg = q.view(B, Hkv, Hq // Hkv, D).to(k.dtype)
        s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale_of(ctx, D)  # [B, Hkv, G, T]
        valid = valid_units(kl, T)
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0).amax(2)  # probabilities, group max [B, Hkv, T]
        if self.pool_kernel > 1:
            p = F.max_pool1d(p.view(B * Hkv, 1, T), self.pool_kernel, stride=1,
                             padding=self.pool_kernel // 2).view(B, Hkv, T)
        p = p.masked_fill(~valid[:, None, :], float("-inf"))
        # the context is the longest sequence's valid tokens, not the row width (a static cache's
        # buffer is wider than what it holds)
        n_ctx = min(int(kl.max()), T) if kl.numel() else T
        K = self.budget if self.budget is not None else max(1, math.ceil(self.budget_ratio * n_ctx))
        top = p.topk(min(K, T), dim=-1)
        # descending score; equal scores (max-pooling makes neighbours equal) rank the earlier token first
        idx, val = top.indices.sort(-1)
        val = torch.gather(top.values, 2, val)
        order = torch.gather(idx, 2, val.sort(dim=-1, descending=True, stable=True).indices)
        n_valid = torch.clamp(kl, max=K)[:, None].expand(B, Hkv)
        return order, n_valid.contiguous(), K

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        ctx = ctx if ctx is not None else SelectContext()
        B, Hkv, T = k.shape[0], k.shape[1], k.shape[2]
        states = ctx.state.setdefault("recycled_attention", {})
        st = states.get(ctx.layer)
        if st is not None and (st["order"].shape[:2] != (B, Hkv) or bool((kl < st["kv_lens"]).any())):
            st = None  # a different batch or a new sequence: start over with a full step
        full = self._is_full(st, q)
        ctx.full_step = full
        if full:
            order, n_rec, K = self._rank(q, k, kl, ctx)
            states[ctx.layer] = {"order": order, "n_rec": n_rec, "K": K, "kv_lens": kl.clone(), "since": 0,
                                 "q": q.float().mean(1)}
            return full_pattern(B, Hkv, kl, T)
        st["since"] += 1
        order, n_rec, K = st["order"], st["n_rec"], st["K"]
        n_new = (kl - st["kv_lens"])[:, None]  # tokens appended since the full step, the current one included
        evicted = (n_rec + n_new - 1 - K).clamp(min=0)  # evictions so far from C_p (K entries at most)
        keep_rec = (n_rec - evicted).clamp(min=0)  # the top-ranked recycled tokens still in C_p
        new_lo = st["kv_lens"][:, None] + (evicted - n_rec).clamp(min=0)  # oldest new token still in C_p
        mask = torch.zeros(B, Hkv, T, dtype=torch.bool, device=k.device)
        rank_ok = torch.arange(order.shape[-1], device=k.device) < keep_rec[..., None]
        mask.scatter_(2, order.clamp(max=T - 1), rank_ok)
        t = torch.arange(T, device=k.device)
        mask |= (t >= new_lo[..., None]) & (t < kl[:, None, None])
        return mask_to_pattern(mask, T)
