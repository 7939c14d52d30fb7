"""Patterns: pattern algebra -- union / intersection of element masks, tile deduplication, assembly
of a BlockPattern from block selections and element tiles, and per-head merging."""
from __future__ import annotations

from typing import Optional

import torch

from ._util import Tensor, _cdiv, _err
from .block import BlockPattern, _broadcast_heads, _lists_from_sel
from .token import TokenPattern


_HASH_P = 2147483629  # a prime below 2**31


def _unique_tiles(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of a bool matrix ``[P, n]`` -> (rows ``[U, n]``, inverse ``[P]``).

    ``torch.unique(dim=0)`` sorts whole rows (slow on long contexts: thousands of 64x64 tiles);
    instead the rows are packed into 31-bit words, hashed twice modulo a prime, and made unique
    by hash. Every row is then compared with its representative; on a hash collision (never
    seen, but possible) the exact ``torch.unique(dim=0)`` is used."""
    P_, n = tiles.shape
    dev = tiles.device
    W = _cdiv(n, 31)
    padded = torch.nn.functional.pad(tiles, (0, W * 31 - n)).view(P_, W, 31).long()
    words = (padded << torch.arange(31, device=dev)).sum(-1)  # [P, W], each < 2**31
    gen = torch.Generator().manual_seed(12345)
    mult = torch.randint(1, _HASH_P, (2, W), generator=gen).to(dev)
    h = [((words * m) % _HASH_P).sum(-1) % _HASH_P for m in mult]  # products < 2**62, sums < 2**31 * W
    key = h[0] * _HASH_P + h[1]
    ukey, inv = torch.unique(key, return_inverse=True)
    first = torch.full((ukey.numel(),), P_, dtype=torch.long, device=dev)
    first.scatter_reduce_(0, inv, torch.arange(P_, device=dev), reduce="amin")
    uniq = tiles[first]
    if not torch.equal(uniq[inv], tiles):  # a collision: fall back to the exact row sort
        return torch.unique(tiles, dim=0, return_inverse=True)
    return uniq, inv


def _assemble(full: Tensor, part: Tensor, part_coords, tiles: Optional[Tensor], bq: int, bk: int,
              q_len: int, kv_len: int, is_causal: bool, columns: Optional[TokenPattern] = None) -> BlockPattern:
    """Build a BlockPattern from block selections and, for partial blocks, element tiles.

    ``tiles`` (bool ``[P, bq, bk]``, aligned with ``part.nonzero()`` order) may be None (partial
    blocks masked only by causality and bounds). Tiles that add nothing beyond causality and
    bounds get id -1; the rest are deduplicated into the bank. Partial blocks whose tile is empty
    are dropped; full-row tiles stay partial (a kernel may not skip bounds/causality there).
    """
    dev = full.device
    mask_ids = mask_bank = None
    if tiles is not None and tiles.shape[0]:
        b, h, q, k = part_coords
        off = kv_len - q_len
        r = q[:, None, None] * bq + torch.arange(bq, device=dev)[:, None]
        c = k[:, None, None] * bk + torch.arange(bk, device=dev)[None, :]
        base = (r < q_len) & (c < kv_len)
        if is_causal:
            base = base & (c <= r + off)
        eff = tiles & base
        nonempty = eff.flatten(1).any(1)
        plain = (eff == base).flatten(1).all(1)
        part = part.clone()
        part[b[~nonempty], h[~nonempty], q[~nonempty], k[~nonempty]] = False
        # full blocks off the diagonal where the tile covers everything can be promoted to full
        keep = nonempty
        b, h, q, k, eff, plain = b[keep], h[keep], q[keep], k[keep], eff[keep], plain[keep]
        need = ~plain
        ids_flat = torch.full((b.numel(),), -1, dtype=torch.long, device=dev)
        if need.any():
            uniq, inv = _unique_tiles(eff[need].flatten(1))
            mask_bank = uniq.view(-1, bq, bk).contiguous()
            ids_flat[need] = inv
            idmap = torch.full(part.shape, -1, dtype=torch.int32, device=dev)
            idmap[b, h, q, k] = ids_flat.to(torch.int32)
        else:
            idmap = None
    else:
        idmap = None
    full_cnt, full_idx = _lists_from_sel(full)
    part_cnt, part_idx = _lists_from_sel(part)
    if idmap is not None:
        mask_ids = torch.gather(idmap, 3, part_idx.long())
        valid = torch.arange(part_idx.shape[-1], device=dev) < part_cnt[..., None]
        mask_ids = torch.where(valid, mask_ids, torch.full_like(mask_ids, -1)).contiguous()
    return BlockPattern(part_cnt, part_idx, full_cnt, full_idx, bq, bk, q_len, kv_len, is_causal,
                        mask_ids, mask_bank, columns)


# ----------------------------------------------------------------------------------------------
# Constructors
# ----------------------------------------------------------------------------------------------


def combine(self: BlockPattern, other: BlockPattern, op: str) -> BlockPattern:
    """combine: the union (``op="union"``) or intersection of two patterns' element masks (same block
    sizes, lengths and causal flag; batch and heads broadcast from 1). Intersection refuses columns."""
    if not isinstance(other, BlockPattern):
        raise _err("other", "a BlockPattern", type(other))
    for name in ("block_q", "block_k", "q_len", "kv_len", "causal"):
        if getattr(self, name) != getattr(other, name):
            raise _err(f"other.{name}", repr(getattr(self, name)), repr(getattr(other, name)))
    if self.device != other.device:
        raise _err("other.device", str(self.device), other.device)
    B = max(self.batch, other.batch)
    H = max(self.heads, other.heads)
    for p in (self, other):
        if p.batch not in (1, B) or p.heads not in (1, H):
            raise _err("other", f"batch/heads broadcastable to ({B}, {H})", (p.batch, p.heads))
    bq, bk = self.block_q, self.block_k
    sa, ia = self._tiles_dense()
    sb, ib = other._tiles_dense()
    sa, ia, sb, ib = (t.expand(B, H, -1, -1) for t in (sa, ia, sb, ib))
    ones = torch.ones(1, bq, bk, dtype=torch.bool, device=self.device)
    bank_a = torch.cat([self.mask_bank if self.mask_bank is not None else ones[:0], ones])
    bank_b = torch.cat([other.mask_bank if other.mask_bank is not None else ones[:0], ones])
    ta = torch.where(ia < 0, bank_a.shape[0] - 1, ia)
    tb = torch.where(ib < 0, bank_b.shape[0] - 1, ib)
    if op == "union":
        full = (sa == 2) | (sb == 2)
        part = ~full & ((sa == 1) | (sb == 1))
    else:
        full = (sa == 2) & (sb == 2)
        part = ~full & (sa > 0) & (sb > 0)
    b, h, q, k = part.nonzero(as_tuple=True)
    tile_a = torch.where((sa[b, h, q, k] > 0)[:, None, None], bank_a[ta[b, h, q, k]], False)
    tile_b = torch.where((sb[b, h, q, k] > 0)[:, None, None], bank_b[tb[b, h, q, k]], False)
    if op == "union":
        # a full block counts as an all-true tile
        tile_a = tile_a | (sa[b, h, q, k] == 2)[:, None, None]
        tile_b = tile_b | (sb[b, h, q, k] == 2)[:, None, None]
        tiles = tile_a | tile_b
    else:
        tile_a = tile_a | (sa[b, h, q, k] == 2)[:, None, None]
        tile_b = tile_b | (sb[b, h, q, k] == 2)[:, None, None]
        tiles = tile_a & tile_b
    columns = None
    if self.columns is not None or other.columns is not None:
        if op != "union":
            raise ValueError("other: intersection of patterns with columns is not supported; "
                             "intersect the block parts and choose the columns explicitly")
        cols = [p.columns.to_token_mask() for p in (self, other) if p.columns is not None]
        cols = [_broadcast_heads(c, H, "columns").expand(B, H, -1) for c in cols]
        cm = cols[0] if len(cols) == 1 else cols[0] | cols[1]
        columns = TokenPattern.from_mask(cm, kv_len=self.kv_len)
    return _assemble(full, part, (b, h, q, k), tiles, bq, bk, self.q_len, self.kv_len, self.causal, columns)


def merge_heads(parts, n_heads: int) -> BlockPattern:
    """merge_heads: one pattern of ``n_heads`` heads from per-head parts -- the one per-head merging rule.

    ``parts``: ``(heads, pattern)`` or ``(heads, pattern, source_heads)`` tuples. Head ``heads[i]`` of
    the result is head ``source_heads[i]`` of the part's pattern; without ``source_heads`` it is head
    ``i`` (a pattern with ``len(heads)`` heads) or head 0 (a pattern with one head). Rule: every result
    head comes from at most one part (a head named twice is a ValueError); heads no part names are
    empty; all parts share block sizes, lengths and causal flag (ValueError naming the part); batch
    broadcasts from 1; each part's blocks, element tiles (its mask bank, ids offset) and columns are
    taken as they are (nothing re-deduplicated), so the element mask of every head is exactly its
    source head's.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("parts: expected at least one (heads, pattern) pair")
    if not isinstance(n_heads, int) or n_heads < 1:
        raise _err("n_heads", "an int >= 1", n_heads)
    pats = [pt[1] for pt in parts]
    p0 = pats[0]
    for j, p in enumerate(pats):
        if not isinstance(p, BlockPattern):
            raise _err(f"parts[{j}] pattern", "a BlockPattern", type(p).__name__)
        for name in ("block_q", "block_k", "q_len", "kv_len", "causal"):
            if getattr(p, name) != getattr(p0, name):
                raise _err(f"parts[{j}] pattern.{name}", repr(getattr(p0, name)), repr(getattr(p, name)))
    B = max(p.batch for p in pats)
    dev = p0.device
    src_pat = [-1] * n_heads
    src_head = [0] * n_heads
    for j, pt in enumerate(parts):
        heads, p = [int(h) for h in pt[0]], pt[1]
        if p.batch not in (1, B) or p.device != dev:
            raise _err(f"parts[{j}] pattern", f"batch 1 or {B} on {dev}", (p.batch, p.device))
        if len(pt) > 2:
            srcs = [int(s) for s in pt[2]]
            if len(srcs) != len(heads) or any(not 0 <= s < p.heads for s in srcs):
                raise _err(f"parts[{j}] source_heads", f"{len(heads)} heads in [0, {p.heads})", srcs)
        elif p.heads in (1, len(heads)):
            srcs = [i if p.heads > 1 else 0 for i in range(len(heads))]
        else:
            raise _err(f"parts[{j}] pattern heads", f"1 or {len(heads)}", p.heads)
        for h, s in zip(heads, srcs):
            if not 0 <= h < n_heads:
                raise _err(f"parts[{j}] heads", f"indices in [0, {n_heads})", h)
            if src_pat[h] >= 0:
                raise _err(f"parts[{j}] heads", "each head in one part only", f"head {h} again")
            src_pat[h], src_head[h] = j, s
    wp = max(p.kv_indices.shape[-1] for p in pats)
    wf = max(p.full_kv_indices.shape[-1] for p in pats)
    offs, o = [], 0
    for p in pats:
        offs.append(o)
        o += 0 if p.mask_bank is None else p.mask_bank.shape[0]

    def gather(get, w, fill, dtype=torch.int32):
        out = None
        for j, p in enumerate(pats):
            hs = [h for h in range(n_heads) if src_pat[h] == j]
            t = get(j, p)
            if out is None:
                out = torch.full((B, n_heads, *t.shape[2:-1], w) if w else (B, n_heads, *t.shape[2:]), fill,
                                 dtype=dtype, device=dev)
            if not hs:
                continue
            if w:
                t = torch.nn.functional.pad(t, (0, w - t.shape[-1]), value=fill)
            sh = torch.tensor([src_head[h] for h in hs], device=dev)
            out[:, torch.tensor(hs, device=dev)] = t.expand(B, *t.shape[1:])[:, sh].to(dtype)
        return out.contiguous()

    kvn = gather(lambda j, p: p.kv_num_blocks, 0, 0)
    kvi = gather(lambda j, p: p.kv_indices, wp, 0)
    fkn = gather(lambda j, p: p.full_kv_num_blocks, 0, 0)
    fki = gather(lambda j, p: p.full_kv_indices, wf, 0)
    mask_ids = mask_bank = None
    if o:
        mask_bank = torch.cat([p.mask_bank for p in pats if p.mask_bank is not None]).contiguous()
        mask_ids = gather(lambda j, p: torch.full_like(p.kv_indices, -1) if p.mask_ids is None
                          else torch.where(p.mask_ids >= 0, p.mask_ids + offs[j], p.mask_ids), wp, -1)
    columns = None
    if any(p.columns is not None for p in pats):
        sizes = {p.columns.page_size for p in pats if p.columns is not None}
        if len(sizes) != 1:
            raise _err("parts columns page_size", "one page size", sorted(sizes))
        wc = max(p.columns.indices.shape[-1] for p in pats if p.columns is not None)
        z = torch.zeros(1, 1, 1, dtype=torch.int32, device=dev)
        cols = [None if p.columns is None else  # column lists per head of the part's pattern
                (_broadcast_heads(p.columns.indices, p.heads, f"parts[{j}] columns"),
                 _broadcast_heads(p.columns.counts[..., None], p.heads, f"parts[{j}] columns")[..., 0])
                for j, p in enumerate(pats)]
        # a part without columns contributes none on each of its heads (z broadcast to its head count)
        cidx = gather(lambda j, p: z.expand(1, p.heads, 1) if cols[j] is None else cols[j][0], wc, 0)
        ccnt = gather(lambda j, p: z[..., 0].expand(1, p.heads) if cols[j] is None else cols[j][1], 0, 0)
        columns = TokenPattern(cidx, ccnt, p0.kv_len, sizes.pop())
    return BlockPattern(kvn, kvi, fkn, fki, p0.block_q, p0.block_k, p0.q_len, p0.kv_len, p0.causal,
                        mask_ids=mask_ids, mask_bank=mask_bank, columns=columns)
