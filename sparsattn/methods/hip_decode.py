"""hip_decode: HiP Attention's decode phase, a hierarchical top-k key-block mask refreshed every few steps."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ._select import decode_inputs, mask_to_pattern, sink_window_mask
from ..patterns import TokenPattern
from ._common import check_int
from .base import Method, PresetContext, SelectContext, register
from .hip import tree_search


@register("hip_decode")
@dataclass
class HiPDecode(Method):
    """HiPDecode: HiP's tree search over the KV cache at refresh steps, the mask reused in between
    (HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning, arXiv 2406.09827).

    Refresh step (the first call for a layer, then every ``refresh_interval`` steps): the decode
    query searches the cached keys outside the sinks and the window, ``[n_sink, L - window)`` with
    ``L = kv_lens[b]``, with HiP's hierarchical pruning (``hip.tree_search``: ``mask_k / block_k``
    equal nodes, each split in two and scored at its centre key, the best ``mask_k / block_k``
    children kept, until every node is one block of ``block_k`` tokens). The selection is the kept
    blocks (``mask_k`` tokens) + the first ``n_sink`` tokens + the last ``window`` tokens.
    Between refreshes the mask of the last refresh is reused unchanged, plus every token appended
    since (the current one included): they are the new end of the local window. A step therefore
    reads at most ``n_sink + window + mask_k + refresh_interval - 1`` tokens per KV head.

    GQA: one selection per KV head; the group's query heads are the rows of one HiP query block,
    so a node's score is the max over the group of ``q_h · k_centre`` (HiP's max over a query
    block's rows).

    Defaults: ``mask_k`` 512, ``n_sink`` 16 (``sink_token_size``), ``window`` 256
    (``sliding_window_size``), ``block_k`` 2 (``block_size_k``) from HiP v1.1 ``HiPAttentionArgs``
    (METHODS.md A2 [code]); ``refresh_interval`` 8 is the default of the repository's decode
    benchmark (``refresh_interval``) and InfiniteHiP's finest-stage ``mask_refresh_interval``
    ([32, 16, 8]). Difference from the repository: the search excludes the sink and window tokens
    (its ``EXCLUDE_SLIDING_WINDOW`` option) so that they are not counted twice in the budget.

    State per layer in ``ctx.state["hip_decode"][layer]`` (a different batch/head shape or a
    shorter cache starts over with a refresh); ``ctx.mask_refresh`` tells whether this
    step refreshed. ``select(q [B, Hq, (1,) D], k_cache [B, Hkv, T, D], ctx) -> TokenPattern``
    (heads Hkv, token indices in ``[0, kv_lens[b])``). ``mask_k`` larger than the cache is clamped
    with a warning (the whole cache is then read).
    """

    paper = "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning (arXiv 2406.09827)"
    phase = "decode"
    mask_k: int = 512
    block_k: int = 2
    n_sink: int = 16
    window: int = 256
    refresh_interval: int = 8
    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> dict:
        """Preset: refresh every 8 steps (``B // 8`` below 64 tokens); sinks ``min(16, B // 16)``, window
        ``B // 4`` and the tokens appended between refreshes come out of B, the rest is HiP's ``mask_k``
        (a multiple of ``block_k = 2``)."""
        B = int(budget_tokens)
        R = 8 if B >= 64 else max(1, B // 8)
        n_sink, window, bk = min(16, B // 16), max(1, B // 4), 2
        return {"mask_k": max(bk, (B - n_sink - window - (R - 1)) // bk * bk), "block_k": bk,
                "n_sink": n_sink, "window": window, "refresh_interval": R}


    def __post_init__(self):
        check_int("block_k", self.block_k, 1)
        check_int("mask_k", self.mask_k, 1)
        if self.mask_k % self.block_k:
            raise ValueError(f"mask_k: expected a multiple of block_k={self.block_k}, got {self.mask_k}")
        check_int("n_sink", self.n_sink, 0)
        check_int("window", self.window, 1)
        check_int("refresh_interval", self.refresh_interval, 1)

    def search_mask(self, q: torch.Tensor, k: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
        """The refresh-step selection as a bool mask ``[B, Hkv, T]``: HiP's kept blocks in
        ``[n_sink, L - window)`` plus the sinks and the window (all within ``[0, L)``)."""
        B, Hq, D = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        bk = self.block_k
        dev = k.device
        L = kv_lens.to(dev).long()
        lo = torch.clamp(L, max=self.n_sink)
        hi = torch.maximum(L - self.window, lo)
        mask = sink_window_mask(B, Hkv, T, L, self.n_sink, self.window).clone()
        units = (hi + bk - 1) // bk - lo // bk  # candidate blocks per sequence
        n_max = int(units.max()) if B else 0
        if n_max <= 0:
            return mask
        K = min(self.mask_k // bk, n_max)  # more nodes than blocks would only add empty ones
        qb = q.reshape(B, Hkv, 1, Hq // Hkv, D)  # the group's heads = the rows of one query block
        blk, ok = tree_search(qb, k, torch.arange(Hkv, device=dev), lo[:, None], hi[:, None], K, bk)
        tok = blk[:, :, 0, :, None] * bk + torch.arange(bk, device=dev)  # [B, Hkv, K, bk]
        keep = ok[:, :, 0, :, None] & (tok < L[:, None, None, None])
        tok = torch.where(keep, tok, torch.full_like(tok, T)).flatten(2)  # dropped ones go to slot T
        full = torch.cat([mask, mask.new_zeros(B, Hkv, 1)], 2)
        full.scatter_(2, tok, True)
        return full[..., :T] | mask

    @staticmethod
    def _extend(pat: TokenPattern, old: torch.Tensor, new: torch.Tensor, T: int) -> TokenPattern:
        """``pat`` (indices < ``old[b]``) plus the tokens ``[old[b], new[b])`` of each sequence."""
        B, H, n = pat.indices.shape
        add = (new - old).clamp(min=0)
        m = int(add.max()) if B else 0
        if m == 0:
            return TokenPattern(pat.indices, pat.counts, T, 1)
        j = torch.arange(m, device=pat.device)
        extra = (old[:, None] + j)[:, None, :].expand(B, H, m)
        extra_ok = (j[None, :] < add[:, None])[:, None, :].expand(B, H, m)
        base_ok = torch.arange(n, device=pat.device)[None, None, :] < pat.counts[..., None]
        big = T + n + m  # invalid entries sort to the end
        idx = torch.cat([torch.where(base_ok, pat.indices.long(), torch.full_like(pat.indices, big).long()),
                         torch.where(extra_ok, extra, torch.full_like(extra, big))], 2).sort(-1).values
        idx = torch.where(idx >= big, torch.zeros_like(idx), idx)
        counts = pat.counts + add[:, None].to(torch.int32)
        return TokenPattern(idx.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous(), T, 1)

    def select(self, q, k, ctx: SelectContext | None = None):
        q, k, kl = decode_inputs(q, k, ctx)
        ctx = ctx if ctx is not None else SelectContext()
        B, Hkv, T = k.shape[0], k.shape[1], k.shape[2]
        states = ctx.state.setdefault("hip_decode", {})
        st = states.get(ctx.layer)
        if st is not None and (st["pattern"].indices.shape[:2] != (B, Hkv) or bool((kl < st["kv_lens"]).any())):
            st = None  # a different batch or a new sequence: start over with a refresh
        refresh = st is None or st["since"] + 1 >= self.refresh_interval
        ctx.mask_refresh = refresh
        if refresh:
            L = int(kl.max()) if B else 0
            if self.mask_k > L and not states.get("_warned"):
                warnings.warn(f"hip_decode: mask_k={self.mask_k} exceeds the cache ({L} tokens); clamped to the "
                              "cache (every token is read)", stacklevel=2)
                states["_warned"] = True
            pat = mask_to_pattern(self.search_mask(q, k, kl), T)
            states[ctx.layer] = {"pattern": pat, "kv_lens": kl.clone(), "since": 0}
            return pat
        st["since"] += 1
        return self._extend(st["pattern"], st["kv_lens"], kl, T)
