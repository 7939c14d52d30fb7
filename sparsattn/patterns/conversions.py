"""Patterns: conversions from block masks, top-k block indices, dense element masks and FlexAttention
BlockMasks to BlockPattern."""
from __future__ import annotations

from typing import Optional

import torch

from ._util import Tensor, _cdiv, _err, list_width
from .algebra import _assemble
from .block import BlockPattern, _lists_from_sel, _sel_from_lists
from .predicates import _block_grid, _check_lengths


def from_block_mask(block_mask: Tensor, *, block_size, q_len: int, kv_len: Optional[int] = None,
                    causal: bool = False) -> BlockPattern:
    """from_block_mask: BlockPattern from a bool block mask ``[B or 1, H or 1, n_q_blocks, n_kv_blocks]``.

    Blocks crossing the diagonal (when ``causal``) or the sequence end are partial; the rest full.
    Blocks entirely above the diagonal are dropped. ``block_size`` is an int or ``(block_q, block_k)``.
    """
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    kv_len, bk = _check_lengths(q_len, kv_len, bq, bk)
    if not isinstance(block_mask, Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise _err("block_mask", "a bool tensor [B, H, n_q_blocks, n_kv_blocks]",
                   (getattr(block_mask, "dtype", type(block_mask)), tuple(getattr(block_mask, "shape", ()))))
    nq, nk = _cdiv(q_len, bq), _cdiv(kv_len, bk)
    if tuple(block_mask.shape[2:]) != (nq, nk):
        raise _err("block_mask", f"[..., {nq}, {nk}] blocks for q_len={q_len}, kv_len={kv_len}, block=({bq},{bk})",
                   tuple(block_mask.shape))
    dev = block_mask.device
    r0, r1, c0, c1 = _block_grid(q_len, kv_len, bq, bk, dev)
    sel = block_mask
    if causal:
        off = kv_len - q_len
        anyc = c0 <= r1 + off
        fullc = c1 <= r0 + off
        sel = sel & anyc
        full = sel & fullc
    else:
        full = sel.clone()
    part = sel & ~full
    fc, fi = _lists_from_sel(full)
    pc, pi = _lists_from_sel(part)
    return BlockPattern(pc, pi, fc, fi, bq, bk, q_len, kv_len, causal)


def from_topk_blocks(indices: Tensor, *, q_len: int, kv_len: Optional[int] = None, block_size=64,
                     causal: bool = True, counts: Optional[Tensor] = None) -> BlockPattern:
    """from_topk_blocks: BlockPattern from per-query-block key-block indices ``[B, H, nq, k]``
    (any order, duplicates and out-of-causal entries dropped); ``counts [B, H, nq]`` optional.

    Same pattern as ``from_block_mask`` of the selected blocks, built in ``O(nq * k log k)``
    without a ``[nq, n_kv_blocks]`` mask (the cost of index building at long contexts)."""
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    kv_len, bk = _check_lengths(q_len, kv_len, bq, bk)
    nq, nk = _cdiv(q_len, bq), _cdiv(kv_len, bk)
    if not isinstance(indices, Tensor) or indices.dim() != 4 or indices.shape[2] != nq:
        raise _err("indices", f"an int tensor [B, H, {nq}, k]", tuple(getattr(indices, "shape", ())))
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise _err("indices", "an integer tensor", indices.dtype)
    dev = indices.device
    idx = indices.long()
    valid = (idx >= 0) & (idx < nk)
    if counts is not None:
        valid = valid & (torch.arange(idx.shape[-1], device=dev) < counts[..., None])
    key = torch.where(valid, idx, nk).sort(dim=-1).values  # the only sort; duplicates now adjacent
    ok = key < nk
    if key.shape[-1] > 1:
        ok[..., 1:] &= key[..., 1:] != key[..., :-1]
    kb = key.clamp(max=max(nk - 1, 0))
    qb = torch.arange(nq, device=dev)[:, None]
    r0, r1 = qb * bq, torch.clamp((qb + 1) * bq, max=q_len) - 1
    c0, c1 = kb * bk, torch.clamp((kb + 1) * bk, max=kv_len) - 1
    if causal:
        off = kv_len - q_len
        ok = ok & (c0 <= r1 + off)
        full = ok & (c1 <= r0 + off)
    else:
        full = ok
    fc, fi = _compact_sorted(key, full)
    pc, pi = _compact_sorted(key, ok & ~full)
    return BlockPattern(pc, pi, fc, fi, bq, bk, q_len, kv_len, causal)


def _compact_sorted(key: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The ``keep`` entries of ascending ``key [..., k]`` moved to the front, order kept ->
    (counts int32, int32 lists ``[..., max(count, 1)]`` padded with 0), as ``_lists_from_sel``."""
    counts = keep.sum(-1, dtype=torch.int32)
    max_n = list_width(counts, key.shape[-1])
    out = torch.zeros(*key.shape[:-1], max_n + 1, dtype=torch.int32, device=key.device)
    if key.shape[-1]:
        slot = torch.where(keep, keep.cumsum(-1) - 1, max_n)
        out.scatter_(-1, slot, key.to(torch.int32))
    return counts.contiguous(), out[..., :max_n].contiguous()


def from_dense_mask(mask: Tensor, *, block_size=64, causal: bool = False) -> BlockPattern:
    """from_dense_mask: BlockPattern computing exactly a bool element mask ``[B, H, q_len, kv_len]``
    (quadratic: for tests and small inputs). Element tiles of partial blocks go to the mask bank.
    With ``causal=True`` the mask is also ANDed with the causal mask."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        raise _err("mask", "a bool tensor [B, H, q_len, kv_len]", getattr(mask, "shape", type(mask)))
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    B, H, q_len, kv_len = mask.shape
    kv_len, bk = _check_lengths(q_len, kv_len, bq, bk)
    nq, nk = _cdiv(q_len, bq), _cdiv(kv_len, bk)
    dev = mask.device
    m = mask
    i = torch.arange(q_len, device=dev)[:, None]
    j = torch.arange(kv_len, device=dev)[None, :]
    valid = torch.ones(q_len, kv_len, dtype=torch.bool, device=dev)
    if causal:
        valid = j <= i + (kv_len - q_len)
        m = m & valid
    pad = torch.zeros(B, H, nq * bq, nk * bk, dtype=torch.bool, device=dev)
    pad[:, :, :q_len, :kv_len] = m
    vpad = torch.zeros(nq * bq, nk * bk, dtype=torch.bool, device=dev)
    vpad[:q_len, :kv_len] = valid
    tiles = pad.view(B, H, nq, bq, nk, bk).permute(0, 1, 2, 4, 3, 5)
    vt = vpad.view(nq, bq, nk, bk).permute(0, 2, 1, 3)
    anyb = tiles.any(-1).any(-1)
    fullb = (tiles | ~vt).all(-1).all(-1) & anyb
    if causal:  # full blocks must not cross the diagonal (they are computed without element mask)
        r0, r1, c0, c1 = _block_grid(q_len, kv_len, bq, bk, dev)
        fullb = fullb & (c1 <= r0 + (kv_len - q_len))
    part = anyb & ~fullb
    b, h, q, k = part.nonzero(as_tuple=True)
    return _assemble(fullb, part, (b, h, q, k), tiles[b, h, q, k], bq, bk, q_len, kv_len, causal)


def from_flex_block_mask(block_mask, *, causal: bool = False) -> BlockPattern:
    """from_flex_block_mask: BlockPattern from a FlexAttention ``BlockMask``; the ``mask_mod`` is
    evaluated on the partial blocks only (with ``torch.vmap``) and stored as bank tiles."""
    bq, bk = block_mask.BLOCK_SIZE
    q_len, kv_len = block_mask.seq_lengths
    kvn, kvi = block_mask.kv_num_blocks.to(torch.int32), block_mask.kv_indices.to(torch.int32)
    fn = block_mask.full_kv_num_blocks
    fi = block_mask.full_kv_indices
    nk = _cdiv(kv_len, bk)
    nq = _cdiv(q_len, bq)
    kvn, kvi = kvn[:, :, :nq], kvi[:, :, :nq]
    part = _sel_from_lists(kvn, kvi.clamp(0, nk), nk)
    full = _sel_from_lists(fn.to(torch.int32)[:, :, :nq], fi.to(torch.int32)[:, :, :nq].clamp(0, nk), nk) if fn is not None \
        else torch.zeros_like(part)
    part = part & ~full
    b, h, q, k = part.nonzero(as_tuple=True)
    dev = part.device
    tiles = None
    if b.numel():
        mm = block_mask.mask_mod
        rows = q[:, None, None] * bq + torch.arange(bq, device=dev)[None, :, None]
        cols = k[:, None, None] * bk + torch.arange(bk, device=dev)[None, None, :]
        f = torch.vmap(torch.vmap(torch.vmap(mm, in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None)),
                       in_dims=(0, 0, 0, 0))
        tiles = f(b, h, rows[:, :, 0], cols[:, 0, :]).to(torch.bool)
    if causal:
        r0, r1, c0, c1 = _block_grid(q_len, kv_len, bq, bk, dev)
        crossing = full & ~(c1 <= r0 + (kv_len - q_len))
        if crossing.any():
            raise ValueError("block_mask: a full block crosses the causal diagonal; pass causal=False "
                             "or a BlockMask whose diagonal blocks are partial")
    return _assemble(full, part, (b, h, q, k), tiles, bq, bk, q_len, kv_len, causal)


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------
