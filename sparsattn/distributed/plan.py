"""Plan: the communication and compute schedule of one rank, derived locally from the global pattern
and the layout, identically on every rank (Ring Attention, arXiv 2310.01889, with the sparse
schedule of "A Unified View of Long-Sequence Models towards Modeling Million-Scale Dependencies",
arXiv 2302.06218).

* ``need[r][s]``: rank ``r``'s query rows select some key block held by rank ``s``.
* ring: shard ``s`` travels ``s -> s+1 -> ...`` one hop per step and stops after the last rank on
  its way that needs it (``travel[s][t]``: it is still moving at step ``t``); a rank computes on the
  shards it needs and only forwards the others.
* fetch: at step ``t`` rank ``r`` receives from ``r - t`` exactly the key blocks its rows select
  there (``fetch_blocks[r][s]``) and sends ``r + t`` the blocks that rank selects from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..patterns import BlockPattern
from .layout import ShardLayout
from .subpattern import needed_key_blocks, sub_pattern


def _tokens_of_blocks(blocks: torch.Tensor, bk: int, seq_len: int) -> int:
    if blocks.numel() == 0:
        return 0
    last = int(blocks[-1])
    return int(blocks.numel()) * bk - max(0, (last + 1) * bk - seq_len)


@dataclass
class Plan:
    """Plan: one rank's schedule (see the module docstring). Built by ``build_plan``, cached."""

    rank: int
    world: int
    layout: ShardLayout
    lens: list                      # tokens per rank
    need: list                      # need[r][s] bool
    travel: list                    # travel[s][t] bool, t in 0..world-1
    fetch_blocks: list              # fetch_blocks[r][s]: sorted global key blocks r takes from s
    fetch_tokens: list              # fetch_tokens[r][s]: their token count
    ring_sub: dict = field(default_factory=dict)    # s -> local pattern of my rows on shard s
    fetch_sub: dict = field(default_factory=dict)   # s -> local pattern of my rows on fetched blocks
    send_index: dict = field(default_factory=dict)  # r -> local token indices of blocks r takes from me

    def ring_recv(self, t: int) -> Optional[int]:
        """Source shard received at step ``t`` (from rank ``rank - 1``), or None."""
        s = (self.rank - t) % self.world
        return s if self.travel[s][t] else None

    def ring_send(self, t: int) -> Optional[int]:
        """Shard sent at step ``t`` to rank ``rank + 1`` (the one held since step ``t - 1``), or None."""
        s = (self.rank + 1 - t) % self.world
        return s if self.travel[s][t] else None

    def bytes_estimate(self, strategy: str, row_bytes: int, q_row_bytes: int, lse_row_bytes: int = 0) -> int:
        """Bytes this rank receives in forward for ``strategy`` (``row_bytes``: K+V bytes of one
        token; ``q_row_bytes``: Q+O bytes of one token and ``lse_row_bytes`` its lse, for ulysses)."""
        r, W = self.rank, self.world
        if strategy == "fetch":
            return sum(self.fetch_tokens[r][s] for s in range(W) if s != r) * row_bytes
        if strategy == "ring":
            return sum(self.lens[(r - t) % W] for t in range(1, W) if self.travel[(r - t) % W][t]) * row_bytes
        # ulysses: q, k, v of the other ranks' tokens for my 1/W of the heads, then the output
        # (and lse) of my tokens for the other (W-1)/W of the heads
        other = sum(self.lens) - self.lens[r]
        return int(other * (row_bytes + q_row_bytes // 2) // W
                   + self.lens[r] * (q_row_bytes // 2 + lse_row_bytes) * (W - 1) // W)


def _shared(pattern: BlockPattern, layout: ShardLayout):
    """The part of the plan every rank shares (lens, need, travel, fetch lists), cached."""
    key = ("cp_shared", layout)
    if key in pattern._cache:
        return pattern._cache[key]
    W, T = layout.world, layout.seq_len
    bq, bk = pattern.block_q, pattern.block_k
    dev = pattern.device
    lens = [layout.rank_len(r) for r in range(W)]
    owner = torch.full((pattern.n_kv_blocks + 1,), -1, dtype=torch.long, device=dev)
    for r in range(W):
        owner[layout.blocks(r, bk, dev)] = r
    need, fetch_blocks, fetch_tokens = [], [], []
    for r in range(W):
        nb = needed_key_blocks(pattern, layout.blocks(r, bq, dev)) if lens[r] else \
            torch.zeros(pattern.n_kv_blocks, dtype=torch.bool, device=dev)
        blocks = nb.nonzero().flatten()
        own = owner[blocks]
        fb = [blocks[own == s] for s in range(W)]
        fetch_blocks.append(fb)
        fetch_tokens.append([_tokens_of_blocks(b, bk, T) for b in fb])
        need.append([bool(b.numel()) for b in fb])
    travel = [[any(need[(s + u) % W][s] for u in range(t, W)) for t in range(W)] for s in range(W)]
    out = (lens, need, travel, fetch_blocks, fetch_tokens)
    pattern._cache[key] = out
    return out


def build_plan(pattern: BlockPattern, layout: ShardLayout, rank: int, strategy: str) -> Plan:
    """build_plan: the schedule of ``rank`` for ``strategy`` ("ring" or "fetch"; "ulysses" and
    "auto" build the shared part only), cached on the pattern."""
    key = ("cp_plan", layout, rank, strategy)
    cached = pattern._cache.get(key)
    if cached is not None:
        return cached
    W = layout.world
    bq, bk = pattern.block_q, pattern.block_k
    dev = pattern.device
    lens, need, travel, fetch_blocks, fetch_tokens = _shared(pattern, layout)
    kblocks = [layout.blocks(r, bk, dev) for r in range(W)]
    plan = Plan(rank, W, layout, lens, need, travel, fetch_blocks, fetch_tokens)
    qb = layout.blocks(rank, bq, dev)
    if strategy == "ring":
        for s in range(W):
            if need[rank][s]:
                plan.ring_sub[s] = sub_pattern(pattern, qb, lens[rank], kblocks[s], lens[s])
    elif strategy == "fetch":
        for s in range(W):
            if need[rank][s]:
                blocks = kblocks[s] if s == rank else fetch_blocks[rank][s]
                n_tok = lens[s] if s == rank else fetch_tokens[rank][s]
                plan.fetch_sub[s] = sub_pattern(pattern, qb, lens[rank], blocks, n_tok)
        # the local token indices of the blocks each other rank takes from me
        local_of = torch.full((pattern.n_kv_blocks + 1,), -1, dtype=torch.long, device=dev)
        local_of[kblocks[rank]] = torch.arange(kblocks[rank].numel(), device=dev)
        for r in range(W):
            if r == rank or not need[r][rank]:
                continue
            b = fetch_blocks[r][rank]
            starts = local_of[b] * bk
            tok = (starts[:, None] + torch.arange(bk, device=dev)[None]).flatten()
            plan.send_index[r] = tok[tok < lens[rank]].contiguous()
    pattern._cache[key] = plan
    return plan
