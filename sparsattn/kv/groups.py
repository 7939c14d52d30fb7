"""groups: KV head groups, the one rule that splits a layer's KV heads by their row lengths.

After per-head eviction the rows of different KV heads can have very different lengths
(RazorAttention's retrieval heads keep everything, MoA's spans differ per head). The one head-group
storage, ``sparsattn.kv.store.HeadGroupStore`` (used by ``sparsattn.kv.KVCache`` and
``sparsattn.integrations.hf.SparseCache``), then stores each group of similar lengths as its own
tensor, so memory follows the per-head lengths; the groups are decided here by ``head_groups``.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["head_groups", "group_query_heads"]


def head_groups(longest, waste: float) -> list:
    """head_groups: partition KV heads by their longest row into groups of similar length.

    ``longest``: per-head slot counts (e.g. the longest row over the batch). Heads are taken longest
    first (ties by head id); a head joins the current group unless the group's padding (its capacity,
    the first head's length, times its heads, minus their lengths) would exceed ``waste`` of the
    group's storage. Returns lists of head ids (each ascending), ordered by their first head id.
    """
    order = sorted(range(len(longest)), key=lambda h: (-int(longest[h]), h))
    parts, cur, cap, tot = [], [], 0, 0
    for h in order:
        n = int(longest[h])
        if cur:
            alloc = cap * (len(cur) + 1)
            if alloc and (alloc - tot - n) / alloc > waste:
                parts.append(cur)
                cur = []
        if not cur:
            cap, tot = n, 0
        cur.append(h)
        tot += n
    if cur:
        parts.append(cur)
    return sorted((sorted(p) for p in parts), key=lambda p: p[0])


def group_query_heads(heads: Tensor, G: int, device) -> Tensor:
    """group_query_heads: query-head ids ``[H_g * G]`` of KV heads ``heads`` (GQA: query head ``h * G + i``
    reads KV head ``h``), the heads a group's attention runs on."""
    return (heads.to(device)[:, None] * G + torch.arange(G, device=device)).reshape(-1)
