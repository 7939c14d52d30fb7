"""Sub-patterns: a global BlockPattern restricted to one rank's query rows and one set of key blocks,
re-indexed to the local tensors (Ring Attention, arXiv 2310.01889, computed on a block-sparse
pattern as in "A Unified View of Long-Sequence Models towards Modeling Million-Scale Dependencies",
arXiv 2302.06218).

The local pattern is never causal: the causal diagonal of the global pattern becomes an element
tile (from its bank) of the partial blocks it crosses, computed from the blocks' *global*
positions, so any order of local rows and keys gives the global element mask. Everything here is
computed from the global pattern alone, so every rank derives the same schedule without talking.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from ..patterns import BlockPattern


def check_pattern(pattern: BlockPattern, seq_len: int) -> None:
    """Raise ValueError unless ``pattern`` is a global self-attention pattern over ``seq_len`` tokens."""
    if not isinstance(pattern, BlockPattern):
        raise ValueError(f"pattern: expected a sparsattn.patterns.BlockPattern, got {type(pattern).__name__}")
    if pattern.q_len != seq_len or pattern.kv_len != seq_len:
        raise ValueError(f"pattern: expected q_len = kv_len = {seq_len} (the whole sequence), got "
                         f"q_len={pattern.q_len}, kv_len={pattern.kv_len}")
    if pattern.columns is not None:
        raise ValueError("pattern.columns: key columns are not supported by context parallelism; "
                         "use a pattern of blocks (e.g. widen the columns to their key blocks)")


def pattern_hash(pattern: BlockPattern) -> int:
    """A 63-bit hash of everything that defines the pattern's element mask (cached on the pattern)."""
    h = pattern._cache.get("cp_hash")
    if h is not None:
        return h
    d = hashlib.blake2b(digest_size=8)
    d.update(repr((pattern.block_q, pattern.block_k, pattern.q_len, pattern.kv_len, bool(pattern.causal))).encode())
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "mask_ids", "mask_bank"):
        t = getattr(pattern, name)
        if t is None:
            d.update(b"none")
            continue
        t = t.detach().to("cpu").contiguous()
        d.update(repr((name, tuple(t.shape), str(t.dtype))).encode())
        d.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h = int.from_bytes(d.digest(), "little") & ((1 << 63) - 1)
    pattern._cache["cp_hash"] = h
    return h


def needed_key_blocks(pattern: BlockPattern, q_blocks: torch.Tensor) -> torch.Tensor:
    """bool ``[n_kv_blocks]``: key blocks listed (full or partial) by any batch/head of the query
    blocks ``q_blocks`` (global ids)."""
    nk = pattern.n_kv_blocks
    out = torch.zeros(nk + 1, dtype=torch.bool, device=pattern.device)
    qb = q_blocks.to(pattern.device)
    for cnt, idx in ((pattern.full_kv_num_blocks, pattern.full_kv_indices),
                     (pattern.kv_num_blocks, pattern.kv_indices)):
        c, i = cnt[:, :, qb], idx[:, :, qb].long()
        valid = torch.arange(i.shape[-1], device=i.device) < c[..., None]
        out[torch.where(valid, i, nk).flatten()] = True
    return out[:nk]


def _compact(values: list, keep: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Keep the entries ``keep`` of each row (order preserved): (counts int32, [compacted values])."""
    cnt = keep.sum(-1, dtype=torch.int32)
    m = max(int(cnt.max()) if cnt.numel() else 0, 1)
    slot = torch.where(keep, keep.cumsum(-1) - 1, m).long()
    outs = []
    for v in values:
        o = torch.zeros(*keep.shape[:-1], m + 1, dtype=v.dtype, device=v.device)
        o.scatter_(-1, slot, v)
        outs.append(o[..., :m].to(torch.int32).contiguous())
    return cnt.contiguous(), outs


def sub_pattern(pattern: BlockPattern, q_blocks: torch.Tensor, q_len: int, k_blocks: torch.Tensor,
                kv_len: int) -> Optional[BlockPattern]:
    """sub_pattern: ``pattern`` restricted to query blocks ``q_blocks`` and key blocks ``k_blocks``.

    Args:
        pattern: the global pattern (``check_pattern`` passed).
        q_blocks: global query-block ids in local order (local block ``i`` = ``q_blocks[i]``); only
            the last may be the global pattern's partial last block.
        q_len: local query tokens (``len(q_blocks)`` blocks, the last possibly partial).
        k_blocks: global key-block ids, strictly increasing (local key block ``j`` = ``k_blocks[j]``).
        kv_len: local key tokens.
    Returns:
        A non-causal ``BlockPattern`` over ``[q_len, kv_len]`` computing exactly the global element
        mask on those rows and keys, or None when it computes nothing.
    """
    p = pattern
    dev = p.device
    bq, bk = p.block_q, p.block_k
    nkg = p.n_kv_blocks
    qb = q_blocks.to(dev).long()
    kb = k_blocks.to(dev).long()
    if qb.numel() == 0 or kb.numel() == 0:
        return None
    g2l = torch.full((nkg + 1,), -1, dtype=torch.long, device=dev)
    g2l[kb] = torch.arange(kb.numel(), device=dev)

    def take(cnt, idx):
        c, i = cnt[:, :, qb], idx[:, :, qb].long()
        valid = torch.arange(i.shape[-1], device=dev) < c[..., None]
        loc = g2l[torch.where(valid, i, nkg)]
        return i, loc, valid & (loc >= 0)

    # full blocks: kept as they are (a causal full block lies below the diagonal)
    _, floc, fkeep = take(p.full_kv_num_blocks, p.full_kv_indices)
    fcnt, (fidx,) = _compact([floc], fkeep)
    # partial blocks: tile = bank tile (or all-true) AND the causal diagonal at global positions
    gidx, ploc, pkeep = take(p.kv_num_blocks, p.kv_indices)
    ids = p.mask_ids[:, :, qb].long() if p.mask_ids is not None else torch.full_like(gidx, -1)
    ids = torch.where(pkeep, ids, -1)
    tile_key = ids + 1  # 0 = no bank tile
    n_ids = (p.mask_bank.shape[0] if p.mask_bank is not None else 0) + 1
    if p.causal:
        # keys c = kb*bk + b, rows r = qb*bq + a: c <= r + off  <=>  b - a <= delta
        off = p.kv_len - p.q_len
        delta = qb[None, None, :, None] * bq + off - gidx * bk
        delta = delta.clamp(-bq, bk - 1)  # -bq: nothing; bk-1: everything
        tile_key = tile_key * (bq + bk) + (delta + bq)
    else:
        tile_key = tile_key * (bq + bk) + (bk - 1 + bq)
    sel = tile_key[pkeep]
    uniq, inv = torch.unique(sel, return_inverse=True)
    ones = torch.ones(1, bq, bk, dtype=torch.bool, device=dev)
    bank_ext = torch.cat([ones, p.mask_bank]) if p.mask_bank is not None else ones
    a = torch.arange(bq, device=dev)[:, None]
    b = torch.arange(bk, device=dev)[None, :]
    u_id, u_delta = uniq // (bq + bk), uniq % (bq + bk) - bq
    tiles = bank_ext[u_id.clamp_max(n_ids - 1)] & ((b - a)[None] <= u_delta[:, None, None])
    nonempty = tiles.flatten(1).any(1)
    trivial = (u_id == 0) & (u_delta >= bk - 1)  # all-true: bounds only, no tile
    # bank rows for non-trivial, non-empty tiles
    need_bank = nonempty & ~trivial
    bank_row = torch.cumsum(need_bank.long(), 0) - 1
    new_id_u = torch.where(trivial, -1, bank_row)
    keep_u = nonempty
    new_ids = torch.full_like(gidx, -1)
    new_ids[pkeep] = new_id_u[inv]
    pkeep2 = pkeep.clone()
    pkeep2[pkeep] = keep_u[inv]
    pcnt, (pidx, pmids) = _compact([ploc, new_ids], pkeep2)
    if int(fcnt.sum()) + int(pcnt.sum()) == 0:
        return None
    if bool(need_bank.any()):
        bank = tiles[need_bank].contiguous()
        mids = pmids
    else:
        bank = mids = None
    return BlockPattern(pcnt, pidx, fcnt, fidx, bq, bk, int(q_len), int(kv_len), False, mids, bank)


def rank_rows(pattern: BlockPattern, layout, rank: int) -> Optional[BlockPattern]:
    """rank_rows: the global pattern's rows held by ``rank`` (a ``ShardLayout``) over all keys in
    global order: ``attention(shard(q), k, v, rank_rows(...))`` is that rank's output computed on
    one device (None when the rank's rows compute nothing)."""
    bq = pattern.block_q
    return sub_pattern(pattern, layout.blocks(rank, bq, pattern.device), layout.rank_len(rank),
                       torch.arange(pattern.n_kv_blocks, device=pattern.device), pattern.kv_len)
