"""recycled_attention: full decode steps now and then, the top-K of the last full step in between."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..kv.select import decode_inputs, full_pattern, group_scores, mask_to_pattern, scale_of, topk_mask, valid_units
from .base import Method, SelectContext, register


@register("recycled_attention")
@dataclass
class RecycledAttention(Method):
    """RecycledAttention: alternate full steps with steps over the recycled top-K tokens (Recycled Attention,
    arXiv 2411.05787; RefreshKV, its journal version).

    A *full step* reads every token and rebuilds the recycled set: the top ``budget`` tokens of the
    step's attention scores, max-pooled over ``pool_kernel`` neighbouring positions (SnapKV-style),
    the GQA group combined by max. A *partial step* reads the recycled set plus every token
    appended since the last full step (RefreshKV instead evicts the lowest-score token to keep
    exactly K; that needs the partial step's attention scores, which a selector does not compute).
    Schedule: ``"stride"`` = a full step every ``stride`` steps (original Recycled Attention), or
    ``"similarity"`` = every ``check_every`` steps, a full step when the cosine similarity of the
    head-averaged query with the one of the last full step is below ``similarity`` (RefreshKV).

    Defaults [abs]: stride 10 (ablation S in {10, 15}); check_every 5 (QC in {5, 10}); similarity
    0.85 (Llama-3.1-8B); budget K = ``budget_ratio`` x context = 1/8 of the input, or ``budget``
    tokens when set (K = 2048 / 4096 in the paper). ``pool_kernel`` 7 is SnapKV's (unverified).

    State per layer in ``ctx.state["recycled_attention"][layer]``. ``select(q, k_cache, ctx)``
    returns a TokenPattern (heads Hkv); ``ctx.extras["full_step"]`` tells whether it was a full step.
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

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        ctx = ctx if ctx is not None else SelectContext()
        B, Hkv, T = k.shape[0], k.shape[1], k.shape[2]
        states = ctx.state.setdefault("recycled_attention", {})
        st = states.get(ctx.layer)
        if st is not None and (st["mask"].shape[:2] != (B, Hkv) or bool((kl < st["kv_lens"]).any())):
            st = None  # a different batch or a new sequence: start over with a full step
        full = self._is_full(st, q)
        ctx.extras["full_step"] = full
        if full:
            s = group_scores(q, k, "max") * scale_of(ctx, q.shape[-1])
            valid = valid_units(kl, T)
            s = s.masked_fill(~valid[:, None, :], float("-inf"))
            if self.pool_kernel > 1:
                s = F.max_pool1d(s.view(B * Hkv, 1, T), self.pool_kernel, stride=1, padding=self.pool_kernel // 2).view(B, Hkv, T)
            K = self.budget if self.budget is not None else math.ceil(self.budget_ratio * T)
            mask = topk_mask(s, K, valid)
            states[ctx.layer] = {"mask": mask, "kv_lens": kl.clone(), "since": 0, "q": q.float().mean(1)}
            return full_pattern(B, Hkv, kl, T)
        st["since"] += 1
        mask = st["mask"]
        if mask.shape[-1] < T:
            mask = torch.cat([mask, mask.new_zeros(B, Hkv, T - mask.shape[-1])], -1)
        t = torch.arange(T, device=k.device)
        new = (t[None, :] >= st["kv_lens"][:, None]) & (t[None, :] < kl[:, None])  # appended since the full step
        return mask_to_pattern(mask[..., :T] | new[:, None, :], T)
