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
    block stride (2) and decode-time mask refresh are not part of this prefill selection.
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
        off = Tk - Tq
        r1 = torch.clamp((torch.arange(nq, device=dev) + 1) * bq, max=Tq) - 1
        last_key = r1 + off  # last causal key of each query block
        n_units = last_key // bk + 1  # causal key blocks per query block [nq]
        j = torch.arange(K, device=dev)
        s = (j[None, :] * n_units[:, None]) // K  # initial nodes [nq, K] in key-block units
        e = ((j[None, :] + 1) * n_units[:, None]) // K
        s = s[None, None].expand(B, Hq, nq, K).contiguous()
        e = e[None, None].expand(B, Hq, nq, K).contiguous()
        # queries by block, padded rows masked out of the max
        pad = nq * bq - Tq
        qb = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).view(B, Hq, nq, bq, D)
        row_ok = (torch.arange(nq * bq, device=dev) < Tq).view(nq, bq)
        kf = k.float()
        bidx = torch.arange(B, device=dev)[:, None, None, None]
        hidx = (torch.arange(Hq, device=dev) // G)[None, :, None, None]
        lk = last_key[None, None, :, None]
        while bool(((e - s) > 1).any()):
            m = s + (e - s + 1) // 2
            cs = torch.cat([s, m], -1)  # children [B, Hq, nq, 2K]
            ce = torch.cat([m, e], -1)
            nonempty = ce > cs
            t0 = cs * bk
            t1 = torch.minimum(ce * bk, lk + 1)  # causal end of the child (tokens)
            center = torch.clamp((t0 + t1 - 1) // 2, min=0, max=Tk - 1)
            kc = kf[bidx, hidx, center]  # [B, Hq, nq, 2K, D]
            sc = torch.einsum("bhnrd,bhncd->bhnrc", qb, kc)
            sc = sc.masked_fill(~row_ok[None, None, :, :, None], float("-inf")).amax(3)
            sc = sc.masked_fill(~nonempty, float("-inf"))
            top = torch.topk(sc, K, dim=-1).indices
            s, e = torch.gather(cs, -1, top), torch.gather(ce, -1, top)
        return s, e > s

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
