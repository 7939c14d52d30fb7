"""quest: query-aware page selection from per-page key min/max bounds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.unit_scores import bound_scores
from ._select import decode_inputs, full_pattern, lengths_since, record_lengths, topk_pattern, valid_units
from .base import Method, PresetContext, SelectContext, register


@register("quest")
@dataclass
class Quest(Method):
    """Quest: top pages by an upper bound of q·k from per-page key min/max (Quest, arXiv 2406.10774).

    For every page of ``page_size`` tokens the element-wise min and max of its keys are kept; the
    page's criticality for query q is ``sum_d max(q_d * min_d, q_d * max_d)`` (an upper bound of
    q·k over the page), and the ``max(3, token_budget // page_size)`` best pages are read. The
    first ``dense_layers`` layers stay dense. Defaults from the official evaluation code
    (``evaluation/quest_attention.py``: page (chunk) size 16, >= 3 pages, layers 0-1 dense);
    ``token_budget`` 2048 is one of the paper's evaluated budgets.

    The page metadata is kept incrementally in ``ctx.state["quest"][layer]`` (only pages that
    received new tokens are recomputed). GQA: ``head_reduce`` combines the bounds of the query
    heads of a group (default ``"max"``: one page list per KV head, read once for the group);
    ``"none"`` keeps one list per query head as in the paper's MHA setting. The page scores come
    from ``sparsattn.kernels.unit_scores.bound_scores`` (one pass over the bounds; ``backend``: None =
    Triton on CUDA, the torch reference elsewhere). Per step at most one host sync (none when the
    lengths tensor is the one seen last).

    ``select(q [B, Hq, (1,) D], k_cache [B, Hkv, T, D], ctx) -> TokenPattern`` with ``page_size``
    pages, heads Hkv (or Hq for ``head_reduce="none"``).
    """

    paper = "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (arXiv 2406.10774)"
    phase = "decode"
    token_budget: int = 2048
    page_size: int = 16
    dense_layers: int = 2
    head_reduce: str = "max"
    backend: Optional[str] = None
    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> dict:
        """Preset: ``token_budget = B`` (pages of 16; layers 0-1 dense, the paper's)."""
        return {"token_budget": int(budget_tokens)}


    def __post_init__(self):
        if not isinstance(self.token_budget, int) or self.token_budget < 1:
            raise ValueError(f"token_budget: expected an int >= 1, got {self.token_budget!r}")
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"page_size: expected an int >= 1, got {self.page_size!r}")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"dense_layers: expected an int >= 0, got {self.dense_layers!r}")
        if self.head_reduce not in ("max", "mean", "sum", "none"):
            raise ValueError(f"head_reduce: expected 'max', 'mean', 'sum' or 'none', got {self.head_reduce!r}")
        if self.backend not in (None, "triton", "reference"):
            raise ValueError(f"backend: expected None, 'triton' or 'reference', got {self.backend!r}")

    def page_bounds(self, k: torch.Tensor, kv_lens: torch.Tensor, ctx: SelectContext | None):
        """Per-page key (min, max) ``[B, Hkv, n_pages, D]``, updated incrementally in ``ctx.state``."""
        B, H, T, D = k.shape
        P = self.page_size
        n_pages = -(-T // P)
        st = None
        if ctx is not None:
            st = ctx.state.setdefault("quest", {}).get(ctx.layer)
        fits = st is not None and st["kmin"].shape[:2] == (B, H) and st["kmin"].shape[-1] == D and st["T"] <= T
        ok, old_len, new_len = lengths_since(st if fits else None, kv_lens)
        # pages touched since the last call: from the page holding the old length onwards
        if fits and ok:
            first = old_len // P
            kmin, kmax = st["kmin"], st["kmax"]
            if kmin.shape[2] < n_pages:
                pad = n_pages - kmin.shape[2]
                kmin = torch.cat([kmin, kmin.new_zeros(B, H, pad, D)], 2)
                kmax = torch.cat([kmax, kmax.new_zeros(B, H, pad, D)], 2)
        else:
            first = 0
            kmin = k.new_zeros(B, H, n_pages, D)  # stored in the cache's dtype (as Quest's fp16 metadata)
            kmax = k.new_zeros(B, H, n_pages, D)
        last = -(-new_len // P)  # pages holding new tokens
        if first < last:
            seg = k[:, :, first * P:last * P]
            Tp = (last - first) * P
            if seg.shape[2] < Tp:
                seg = torch.cat([seg, seg.new_zeros(B, H, Tp - seg.shape[2], D)], 2)
            t = torch.arange(first * P, last * P, device=k.device)
            ok = (t[None, :] < kv_lens[:, None])[:, None, :, None]  # [B, 1, Tp, 1]
            big = torch.finfo(k.dtype).max
            lo = seg.masked_fill(~ok, big).view(B, H, -1, P, D).amin(3)
            hi = seg.masked_fill(~ok, -big).view(B, H, -1, P, D).amax(3)
            kmin[:, :, first:last] = lo.to(kmin.dtype)  # in place: the state is this method's own
            kmax[:, :, first:last] = hi.to(kmax.dtype)
        if ctx is not None:
            st = {"kmin": kmin, "kmax": kmax, "T": T}
            record_lengths(st, kv_lens)
            ctx.state["quest"][ctx.layer] = st
        return kmin, kmax

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        B, Hq, D = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        rows = Hq if self.head_reduce == "none" else Hkv
        if ctx is not None and ctx.layer is not None and ctx.layer < self.dense_layers:
            return full_pattern(B, rows, kl, T)
        kmin, kmax = self.page_bounds(k, kl, ctx)
        # sum_d max(q_d min_d, q_d max_d) per page, reduced over each GQA group: one pass over the
        # bounds (sparsattn.kernels.unit_scores; the torch reference off CUDA)
        ub = bound_scores(q, kmin, kmax, reduce=self.head_reduce, backend=self.backend)
        n_sel = max(3, self.token_budget // self.page_size)
        valid = valid_units(kl, ub.shape[-1], self.page_size)
        return topk_pattern(ub, n_sel, valid, T, self.page_size)
