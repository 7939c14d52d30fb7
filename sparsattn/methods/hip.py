"""hip: HiP Attention's hierarchical top-k key-block search (arXiv 2406.09827)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import patterns
from ._common import check_inputs, check_int, check_pow2, clamp_budget
from .base import Method, SelectContext, register


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def tree_search(qb: torch.Tensor, k: torch.Tensor, kv_head: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                K: int, block_k: int, row_ok: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """tree_search: HiP's hierarchical top-k key-block search (HiP Attention, arXiv 2406.09827).

    ``qb [B, H, nq, R, D]``: R query rows per query block (a node's score is the max over the
    rows; ``row_ok [nq, R]`` masks padded rows); ``k [B, Hkv, T, D]``; ``kv_head [H]`` long: the KV
    head each row of ``qb`` reads; ``lo, hi [B, nq]`` long: the token range ``[lo, hi)`` searched
    for each query block (empty when ``hi <= lo``); ``K`` the number of key blocks of ``block_k``
    tokens to keep. Key block ``u`` covers tokens ``[u * block_k, (u + 1) * block_k)``; blocks
    overlapping the range are candidates and a child is represented by the key at the centre of
    its part inside the range. Returns ``(block indices long [B, H, nq, K], valid bool [B, H, nq,
    K])``: fewer than K valid entries when the range holds fewer blocks.
    """
    B, H, nq, R, D = qb.shape
    T = k.shape[2]
    bk = block_k
    dev = qb.device
    u0 = torch.div(lo, bk, rounding_mode="floor")
    n_units = torch.clamp(torch.div(hi + bk - 1, bk, rounding_mode="floor") - u0, min=0)  # [B, nq]
    j = torch.arange(K, device=dev)
    # initial nodes: K near-equal ranges of key blocks (empty ones when fewer than K blocks)
    s = (u0[..., None] + (j * n_units[..., None]) // K)[:, None].expand(B, H, nq, K).contiguous()
    e = (u0[..., None] + ((j + 1) * n_units[..., None]) // K)[:, None].expand(B, H, nq, K).contiguous()
    qf = qb.float()
    bidx = torch.arange(B, device=dev)[:, None, None, None]
    hidx = kv_head.to(dev).long()[None, :, None, None]
    lo_, hi_ = lo[:, None, :, None], hi[:, None, :, None]
    while bool(((e - s) > 1).any()):
        m = s + (e - s + 1) // 2
        cs = torch.cat([s, m], -1)  # children [B, H, nq, 2K]
        ce = torch.cat([m, e], -1)
        nonempty = ce > cs
        t0 = torch.maximum(cs * bk, lo_)
        t1 = torch.minimum(ce * bk, hi_)  # the child's part of the searched range (tokens)
        center = torch.clamp((t0 + t1 - 1) // 2, min=0, max=max(T - 1, 0))
        kc = k[bidx, hidx, center].float()  # [B, H, nq, 2K, D]: gathered first, no fp32 copy of K
        sc = torch.einsum("bhnrd,bhncd->bhnrc", qf, kc)
        if row_ok is not None:
            sc = sc.masked_fill(~row_ok[None, None, :, :, None], float("-inf"))
        sc = sc.amax(3).masked_fill(~nonempty, float("-inf"))
        top = torch.topk(sc, K, dim=-1).indices
        s, e = torch.gather(cs, -1, top), torch.gather(ce, -1, top)
    return s, e > s


@register("hip")
@dataclass
class HiP(Method):
    """HiP: per (query head, query block) a tree search for the ``mask_k`` most relevant keys in
    O(N log N), plus sink tokens and a sliding window (HiP Attention, arXiv 2406.09827).

    Search (v1, ``branch_method="half"``, ``sample_method="center"``): start with
    ``K = mask_k / block_k`` equal nodes (contiguous key ranges) covering the causal prefix of the
    query block; repeatedly split every node in two, score each child by the max over the block's
    queries of ``q·k_c`` with ``k_c`` the key at the child's centre, and keep the K best children,
    until every node is one key block of ``block_k`` tokens (about log2(N/mask_k) rounds, each
    O(N·K·d)). The K surviving blocks plus ``sink_token_size`` first keys and a
    ``sliding_window_size`` window form the pattern (element-exact sink/window). Pattern heads =
    query heads (GQA queries scored against their KV head).

    Defaults: HiP v1.1 ``HiPAttentionArgs`` (METHODS.md A2 [code]): mask_k=512, block_size_q=64,
    sliding_window_size=256, sink_token_size=16. Difference: HiP's final node width is
    ``block_size_k = 2`` keys; our kernel works on key blocks of >= 16 tokens, so the search stops
    at ``block_k = 16`` (the pattern's block_k) and keeps ``mask_k / block_k`` blocks. HiP's query
    block stride (2) is not used; the decode-time mask refresh is ``hip_decode`` (hip_decode.py), which
    reuses ``tree_search``.
    """

    paper = "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning (arXiv 2406.09827)"
    phase = "prefill"
    mask_k: int = 512
    block_size_q: int = 64
    block_k: int = 16
    sink_token_size: int = 16
    sliding_window_size: int = 256

    def __post_init__(self):
        check_pow2("block_size_q", self.block_size_q)
        check_pow2("block_k", self.block_k)
        check_int("mask_k", self.mask_k, self.block_k if isinstance(self.block_k, int) else 1)
        if self.mask_k % self.block_k:
            raise ValueError(f"mask_k: expected a multiple of block_k={self.block_k}, got {self.mask_k}")
        check_int("sink_token_size", self.sink_token_size, 0)
        check_int("sliding_window_size", self.sliding_window_size, 1)

    @classmethod
    def conformance_config(cls) -> dict:
        return {"mask_k": 64, "block_size_q": 32, "block_k": 16, "sink_token_size": 4, "sliding_window_size": 32}

    @classmethod
    def conformance_full_config(cls, q_len: int) -> dict:
        return {"mask_k": _cdiv(q_len, 16) * 16, "block_size_q": 32, "block_k": 16, "sink_token_size": 0,
                "sliding_window_size": 16}

    def search(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tree search: ``(block indices long [B, Hq, nq, K], valid bool [B, Hq, nq, K])``.

        One GQA group at a time: peak memory ``O(B · G · N · K)`` (G = query heads per KV head)."""
        Hq, Hkv = q.shape[1], k.shape[1]
        G = Hq // Hkv
        parts = [self._search(q[:, h * G:(h + 1) * G], k[:, h:h + 1]) for h in range(Hkv)]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    def _search(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        bq, bk = self.block_size_q, self.block_k
        nq, nk = _cdiv(Tq, bq), _cdiv(Tk, bk)
        dev = q.device
        K = clamp_budget("hip", "mask_k // block_k", self.mask_k // bk, nk)
        r1 = torch.clamp((torch.arange(nq, device=dev) + 1) * bq, max=Tq) - 1
        last_key = r1 + (Tk - Tq)  # last causal key of each query block
        # queries by block, padded rows masked out of the max
        pad = nq * bq - Tq
        qb = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).view(B, Hq, nq, bq, D)
        row_ok = (torch.arange(nq * bq, device=dev) < Tq).view(nq, bq)
        lo = torch.zeros(B, nq, dtype=torch.long, device=dev)
        hi = (last_key + 1)[None].expand(B, nq)
        kv_head = torch.arange(Hq, device=dev) // G
        return tree_search(qb, k, kv_head, lo, hi, K, bk, row_ok)

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        check_inputs("hip", q, k, ctx)
        Tq, Tk = q.shape[2], k.shape[2]
        idx, ok = self.search(q, k)
        idx = torch.where(ok, idx, torch.full_like(idx, -1))
        found = patterns.from_topk_blocks(idx, q_len=Tq, kv_len=Tk, block_size=(self.block_size_q, self.block_k))
        local = patterns.sink_local(Tq, min(self.sink_token_size, Tk), self.sliding_window_size, kv_len=Tk,
                                    block_q=self.block_size_q, block_k=self.block_k, device=q.device)
        return found.union(local)
