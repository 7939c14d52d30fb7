"""Vertical-slash coverage as MInference's PIT kernel computes it (arXiv 2407.02490), as a BlockPattern.

Not a method module (the registry skips ``_``-prefixed files): the pattern builder of
``vertical_slash`` and of ``minference``'s vertical-slash heads.

MInference's index conversion (``convert_vertical_slash_indexes`` in the authors' ``csrc``) covers a
slash line ``d`` (key ``j = i - d`` for query ``i``) in a query block of rows ``[a0, a0 + bs)``
with ONE window of ``bs`` keys that is not aligned to key blocks: ``[a0 - d, a0 - d + bs)``, the
keys the diagonal crosses in that block (clamped to ``[0, bs)`` where it would start before key
0; skipped where it lies entirely before key 0). Overlapping windows are merged; vertical lines
outside the windows are read as single columns. A key-block-aligned cover (every key block the
diagonal crosses) costs up to twice the keys per slash.

Here the union of those windows is built without a loop: in coordinates relative to the query
block (``y = key - a0``) a window is ``[-d, bs - d)`` for every query block, so the cover of the
key block ``kb`` seen from query block ``qb`` depends only on ``kb - qb`` (plus the clamp, which
only ever adds key block 0). Partially covered key blocks become partial blocks whose bank tile
holds the covered key columns (and any vertical line in them); fully covered ones are full
blocks (or causal partial blocks on the diagonal).

Chunked prefill (``Tq < Tk``): query ``i`` sits at key position ``i + Tk - Tq``, so ``a0`` is the
key position of the block's first row. The last, partial query block uses the window of a whole
block (as the authors' kernel on padded inputs); the causal mask and the bounds cut what is
beyond the sequence.

Remaining differences from the authors' kernel (both measured in ``docs/methods.md``):

* when two windows of one query block are less than ``bs`` apart, their index conversion extends
  the merged range by a whole ``bs`` (``range_end += BLOCK_SIZE_M``) instead of to the second
  window's end, computing up to ``bs - 1`` more keys per merge; here the windows are exact;
* a key block that the windows cover only in part and that also holds a vertical line outside
  them is computed whole here (the authors read that line as one column): the column path of a
  ``BlockPattern`` skips listed blocks, and tiles holding the vertical lines too would differ per
  key block (millions of bank tiles at long contexts); this way the bank holds at most the
  distinct partial window masks (``<= bs (bs + 1) / 2``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..patterns import BlockPattern, TokenPattern
from ._common import column_mask_bank
from ._common import compact_sorted as _compact

Tensor = torch.Tensor


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def vertical_slash_cover(q_len: int, kv_len: int, vertical: Tensor, slash: Tensor, *, block_size: int = 64,
                         vertical_counts: Optional[Tensor] = None,
                         slash_counts: Optional[Tensor] = None) -> BlockPattern:
    """vertical_slash_cover: the causal BlockPattern of MInference's vertical-slash kernel (arXiv 2407.02490).

    Args:
        q_len, kv_len: query and key lengths (``q_len <= kv_len``; queries are the last keys).
        vertical: int ``[B, H, nv]`` key indices of vertical lines (any order, duplicates merged).
        slash: int ``[B, H, ns]`` diagonal offsets ``d = (i + kv_len - q_len) - j`` in ``[0, kv_len]``.
        block_size: query block and window width (the authors' kernel: 64).
        vertical_counts, slash_counts: optional ``[B, H]`` numbers of valid entries (default all).
    Returns:
        BlockPattern with ``H`` heads: slash windows as full / partial (tiled) blocks, verticals
        outside them as ``columns`` (a partially covered block holding a vertical is computed whole).
    """
    if not isinstance(q_len, int) or not isinstance(kv_len, int) or not 0 <= q_len <= kv_len:
        raise ValueError(f"q_len, kv_len: expected ints with 0 <= q_len <= kv_len, got {q_len!r}, {kv_len!r}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two >= 16, got {block_size!r}")
    for name, t in (("vertical", vertical), ("slash", slash)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"{name}: expected an int tensor [B, H, n], got {getattr(t, 'shape', type(t))}")
    if slash.shape[:2] != vertical.shape[:2]:
        raise ValueError(f"slash: expected [{vertical.shape[0]}, {vertical.shape[1]}, ns] (as vertical), "
                         f"got {tuple(slash.shape)}")
    bs = block_size
    dev = vertical.device
    B, H = vertical.shape[:2]
    Tq, Tk = q_len, kv_len
    off = Tk - Tq
    nq, nk = _cdiv(Tq, bs), _cdiv(Tk, bs)
    if nq == 0 or nk == 0:  # nothing to compute
        z = torch.zeros(B, H, nq, dtype=torch.int32, device=dev)
        zi = torch.zeros(B, H, nq, 1, dtype=torch.int32, device=dev)
        return BlockPattern(z, zi, z.clone(), zi.clone(), bs, bs, Tq, Tk, True)
    ns, nv = slash.shape[-1], vertical.shape[-1]
    s_ok = torch.ones(B, H, ns, dtype=torch.bool, device=dev) if slash_counts is None else \
        torch.arange(ns, device=dev) < slash_counts.to(dev)[..., None]
    v_ok = torch.ones(B, H, nv, dtype=torch.bool, device=dev) if vertical_counts is None else \
        torch.arange(nv, device=dev) < vertical_counts.to(dev)[..., None]
    d = slash.long()
    if ((d < 0) | (d > Tk))[s_ok].any():
        raise ValueError(f"slash: expected diagonal offsets in [0, {Tk}], got an offset out of range")
    v = vertical.long()
    if ((v < 0) | (v >= Tk))[v_ok].any():
        raise ValueError(f"vertical: expected key indices in [0, {Tk}), got an index out of range")

    # vertical lines: per key block a column mask, and the column list of the pattern
    vm = torch.zeros(B, H, nk * bs + 1, dtype=torch.bool, device=dev)
    vm.scatter_(-1, torch.where(v_ok, v, nk * bs), True)
    vm = vm[..., :nk * bs]
    columns = TokenPattern.from_mask(vm[..., :Tk].contiguous(), kv_len=Tk)
    vbits = vm.view(B, H, nk, bs)

    # slash windows in block-relative coordinates y = key - a0: [-d, bs - d) for every query block;
    # relative key block m = kb - qb spans y in [m*bs - off, (m + 1)*bs - off)
    m_lo = -(nq - 1)
    m_hi = min(nk - 1, (bs - 1 + off) // bs)
    n_m = max(m_hi - m_lo + 1, 0)
    y0 = m_lo * bs - off
    L = n_m * bs
    diff = torch.zeros(B, H, L + 1, dtype=torch.int32, device=dev)
    lo = (-d - y0).clamp(0, L)
    hi = (bs - d - y0).clamp(0, L)
    one = s_ok.to(torch.int32)
    diff.scatter_add_(-1, lo, one)
    diff.scatter_add_(-1, hi, -one)
    cov = (diff.cumsum(-1)[..., :L] > 0).view(B, H, n_m, bs)
    any_m, full_m = cov.any(-1), cov.all(-1)  # [B, H, n_m]

    # per query block, the relative blocks m with any cover -> key blocks kb = qb + m (sorted)
    m_cnt, m_list = _compact(torch.arange(n_m, device=dev).expand(B, H, n_m), any_m)
    K = m_list.shape[-1]
    qb = torch.arange(nq, device=dev)
    kb = qb[None, None, :, None] + (m_list.long() + m_lo)[:, :, None, :]  # [B, H, nq, K]
    r0 = qb * bs
    r1 = torch.clamp(r0 + bs, max=Tq) - 1
    slot_ok = (torch.arange(K, device=dev) < m_cnt[..., None].long())[:, :, None, :]
    slot_ok = slot_ok & (kb >= 0) & (kb < nk) & (kb * bs <= (r1 + off)[None, None, :, None])
    kb = kb.clamp(0, max(nk - 1, 0))
    mi = m_list.long()[:, :, None, :].expand(B, H, nq, K)
    slot_full = torch.gather(full_m[:, :, None, :].expand(B, H, nq, n_m), 3, mi)

    # the authors' clamp: a window that would start before key 0 (a0 < d < a0 + bs) reads keys [0, bs)
    hist = torch.zeros(B, H, Tk + bs + 2, dtype=torch.int32, device=dev)
    hist.scatter_add_(-1, torch.where(s_ok, d, Tk + bs + 1), torch.ones_like(one))
    cum = hist.cumsum(-1)  # cum[x] = #{d <= x}
    a0 = off + r0
    n_clamped = cum[..., (a0 + bs - 1).clamp(max=Tk + bs)] - cum[..., a0.clamp(max=Tk + bs)]  # [B, H, nq]
    clamp0 = n_clamped > 0
    is0 = slot_ok & (kb == 0)
    slot_full = slot_full | (is0 & clamp0[..., None])
    extra = clamp0 & ~is0.any(-1) & (r1 + off >= 0)[None, None, :]  # block 0 not reached by the cover
    kb = torch.cat([torch.zeros(B, H, nq, 1, dtype=torch.long, device=dev), kb], -1)
    slot_ok = torch.cat([extra[..., None], slot_ok], -1)
    slot_full = torch.cat([torch.ones_like(extra)[..., None], slot_full], -1)
    mi = torch.cat([torch.zeros_like(mi[..., :1]), mi], -1)

    # partially covered blocks: their tile holds the covered columns; one that also holds a vertical
    # line outside them is computed whole (the column path skips listed blocks, and tiles that held
    # the verticals too would differ per key block: millions of tiles at long contexts)
    part_cov = slot_ok & ~slot_full
    pb, ph, pq, ps = part_cov.nonzero(as_tuple=True)
    pm, pk = mi[pb, ph, pq, ps], kb[pb, ph, pq, ps]
    has_v = (vbits[pb, ph, pk] & ~cov[pb, ph, pm]).any(-1)
    slot_full[pb[has_v], ph[has_v], pq[has_v], ps[has_v]] = True
    # tiles: the distinct partial column masks of the relative blocks (at most ~bs^2/2 of them)
    part_m = any_m & ~full_m
    tid_m = torch.full((B, H, n_m), -1, dtype=torch.int32, device=dev)
    mb, mh, mm = part_m.nonzero(as_tuple=True)
    mask_bank, inv = column_mask_bank(cov[mb, mh, mm], bs)  # [P, bs] partial column masks
    tid_m[mb, mh, mm] = inv.to(torch.int32)
    tile_id = torch.where(slot_full, -1, torch.gather(tid_m[:, :, None, :].expand(B, H, nq, n_m), 3, mi))

    # full blocks: fully covered and on or below the diagonal for every row of the query block
    c1 = torch.clamp((kb + 1) * bs, max=Tk) - 1
    below = c1 <= (r0 + off)[None, None, :, None]
    is_full = slot_ok & slot_full & below
    is_part = slot_ok & ~is_full
    # slots are sorted by key block (the extra block-0 slot only where block 0 is not listed)
    fc, fi = _compact(kb, is_full)
    pc, pi = _compact(kb, is_part)
    _, ids = _compact(tile_id, is_part, fill=-1)
    return BlockPattern(pc, pi, fc, fi, bs, bs, Tq, Tk, True, mask_ids=ids, mask_bank=mask_bank, columns=columns)
