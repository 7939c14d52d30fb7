"""hip: HiP Attention's hierarchical top-k key-block search (arXiv 2406.09827)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import patterns
from ._common import check_inputs, check_int, check_pow2, clamp_budget, column_mask_bank, compact_sorted
from .base import DensityKnob, Method, PresetContext, SelectContext, register


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
    block_k=2 (``block_size_k``: the search ends on nodes of 2 keys), sliding_window_size=256,
    sink_token_size=16. The kernels work on key blocks of >= 16 tokens, so with ``block_k < 16``
    the surviving nodes are grouped by 16-token key block: a block whose nodes all survived is a
    full block, the others are partial blocks whose bank tile holds the surviving key columns
    (token-exact; at most 2**(16 / block_k) distinct tiles). ``block_k >= 16`` (a power of two)
    makes the nodes whole kernel blocks (the earlier simplification: ``block_k=16`` keeps
    ``mask_k / 16`` blocks of 16 keys; on the bundled model at 4K and 10% density it found the
    teacher-forced passkey in 3/10 prompts against 8/10 with ``block_k=2``: docs/methods.md). HiP's query block stride (2) is not used; the decode-time
    mask refresh is ``hip_decode`` (hip_decode.py), which reuses ``tree_search``.
    """

    paper = "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning (arXiv 2406.09827)"
    phase = "prefill"
    mask_k: int = 512
    block_size_q: int = 64
    block_k: int = 2
    sink_token_size: int = 16
    sliding_window_size: int = 256
    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> DensityKnob:
        """Preset: sink 16, sliding window max(16, b / 4) (b = target x (T + 1) / 2), block_k 16;
        knob mask_k / 16 (mask_k a multiple of 16): density ~ (16 + window + mask_k) / b."""
        b = target * (T + 1) / 2
        window = int(max(16, b // 4))
        return DensityKnob(cls.name, "mask_k/16", 1, max(1, -(-T // 16)), True, True, max(1.0, (b - window - 16) / 16),
                           lambda x: dict(mask_k=16 * int(x), block_size_q=64, block_k=16, sink_token_size=16,
                                          sliding_window_size=window),
                           lambda x: f"k{16 * int(x)}/sw{window}")


    def __post_init__(self):
        check_pow2("block_size_q", self.block_size_q)
        if isinstance(self.block_k, bool) or not isinstance(self.block_k, int) or self.block_k < 1 or \
                self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k: expected a power of two >= 1 (HiP: 2), got {self.block_k!r}")
        check_int("mask_k", self.mask_k, self.block_k if isinstance(self.block_k, int) else 1)
        if self.mask_k % self.block_k:
            raise ValueError(f"mask_k: expected a multiple of block_k={self.block_k}, got {self.mask_k}")
        check_int("sink_token_size", self.sink_token_size, 0)
        check_int("sliding_window_size", self.sliding_window_size, 1)

    @classmethod
    def small_config(cls) -> dict:
        return {"mask_k": 64, "block_size_q": 32, "block_k": 2, "sink_token_size": 4, "sliding_window_size": 32}

    @classmethod
    def full_config(cls, q_len: int) -> dict:
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

    @property
    def kernel_block_k(self) -> int:
        """Key block of the returned pattern: ``max(16, block_k)``."""
        return max(16, self.block_k)

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        check_inputs("hip", q, k, ctx)
        Tq, Tk = q.shape[2], k.shape[2]
        idx, ok = self.search(q, k)
        bq, bk = self.block_size_q, self.kernel_block_k
        if self.block_k >= 16:
            idx = torch.where(ok, idx, torch.full_like(idx, -1))
            found = patterns.from_topk_blocks(idx, q_len=Tq, kv_len=Tk, block_size=(bq, bk))
        else:
            found = nodes_to_pattern(idx, ok, self.block_k, Tq, Tk, bq, bk)
        local = patterns.sink_local(Tq, min(self.sink_token_size, Tk), self.sliding_window_size, kv_len=Tk,
                                    block_q=bq, block_k=bk, device=q.device)
        return found.union(local)


def nodes_to_pattern(idx: torch.Tensor, ok: torch.Tensor, unit: int, q_len: int, kv_len: int, block_q: int,
                     block_k: int) -> patterns.BlockPattern:
    """nodes_to_pattern: token-exact causal BlockPattern of key nodes of ``unit`` tokens (HiP's
    ``block_size_k``, smaller than the kernel's ``block_k``).

    ``idx [B, H, nq, K]`` long node indices (node ``u`` = keys ``[u * unit, (u + 1) * unit)``, distinct
    per query block where ``ok``). Nodes are grouped by ``block_k``-key block: all nodes of a block
    present -> a full block (a causal partial one on the diagonal), else a partial block whose bank
    tile holds the present columns.
    """
    if block_k % unit:
        raise ValueError(f"unit: expected a divisor of block_k={block_k}, got {unit}")
    B, H, nq, K = idx.shape
    dev = idx.device
    r = block_k // unit  # nodes per kernel block
    big = torch.iinfo(torch.long).max
    key = torch.where(ok, idx.long(), big).sort(-1).values
    valid = key != big
    kb = torch.where(valid, key // r, -1)
    nxt = torch.cat([kb[..., 1:], torch.full_like(kb[..., :1], -2)], -1)
    seg_end = valid & (nxt != kb)  # the last node of each key block
    # per key block, which of its r nodes are present: bit i = node i of the block (nodes are distinct,
    # so a sum over the block's nodes is their OR), summed by a cumulative sum over the sorted nodes
    w = torch.where(valid, torch.ones_like(key) << (key % r).clamp(min=0), 0)
    cum = w.cumsum(-1)
    ends = torch.where(seg_end, cum, torch.zeros_like(cum))
    prev = torch.cat([torch.zeros_like(ends[..., :1]), ends[..., :-1].cummax(-1).values], -1)
    code = cum - prev  # at a segment end: the nodes of its key block
    kbc = kb.clamp(min=0)
    c0, c1 = kbc * block_k, torch.clamp((kbc + 1) * block_k, max=kv_len) - 1
    n_in = torch.clamp(-(-(kv_len - c0) // unit), max=r)  # nodes of the block inside the sequence
    full_code = (torch.ones_like(n_in) << n_in) - 1
    whole = (code & full_code) == full_code
    off = kv_len - q_len
    qb = torch.arange(nq, device=dev)
    r0 = (qb * block_q)[None, None, :, None]
    r1 = (torch.clamp((qb + 1) * block_q, max=q_len) - 1)[None, None, :, None]
    keep = seg_end & (c0 <= r1 + off)
    is_full = keep & whole & (c1 <= r0 + off)
    is_part = keep & ~is_full
    pb, ph, pq, ps = (is_part & ~whole).nonzero(as_tuple=True)
    bits = (code[pb, ph, pq, ps][:, None] >> torch.arange(r, device=dev)) & 1  # [P, r]
    bank, inv = column_mask_bank(bits.bool().repeat_interleave(unit, -1), block_q)
    tile = torch.full((B, H, nq, K), -1, dtype=torch.int32, device=dev)
    tile[pb, ph, pq, ps] = inv.to(torch.int32)
    fc, fi = compact_sorted(kbc, is_full)
    pc, pi = compact_sorted(kbc, is_part)
    _, ids = compact_sorted(tile, is_part, fill=-1)
    return patterns.BlockPattern(pc, pi, fc, fi, block_q, block_k, q_len, kv_len, True, mask_ids=ids, mask_bank=bank)
