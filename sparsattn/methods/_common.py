"""Shared helpers for the training-free prefill methods: validation, budget clamping and
assembling per-head patterns (not a method module: the registry skips ``_``-prefixed files)."""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Optional, Sequence

import torch

from ..patterns import BlockPattern, TokenPattern
from ..patterns._util import list_width
from ..patterns import merge_heads as _merge_heads

Tensor = torch.Tensor


def check_int(name: str, v, lo: int = 0, hi: Optional[int] = None) -> None:
    """Raise ValueError naming ``name`` unless ``v`` is an int in ``[lo, hi]``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected an int {rng}, got {v!r}")


def check_pow2(name: str, v) -> None:
    """Raise ValueError naming ``name`` unless ``v`` is a power of two >= 16 (kernel block sizes)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
        raise ValueError(f"{name}: expected a power of two >= 16, got {v!r}")


def check_fraction(name: str, v, *, allow_zero: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (0 <= v if allow_zero else 0 < v) and v <= 1
    if not ok:
        raise ValueError(f"{name}: expected a number in {'[0' if allow_zero else '(0'}, 1], got {v!r}")


def check_inputs(method: str, q: Tensor, k: Tensor, ctx, *, need_causal: bool = True) -> None:
    """Validate select() inputs: 4-D q/k with matching batch/head_dim, GQA heads, causal context."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, tokens, head_dim], "
                             f"got {getattr(t, 'shape', type(t))}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected batch {q.shape[0]} and head_dim {q.shape[3]} (as q), got {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k heads: expected a divisor of q's {q.shape[1]} heads, got {k.shape[1]}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q tokens: expected at most k's {k.shape[2]} tokens (prefill queries are the "
                         f"last tokens of the keys), got {q.shape[2]}")
    if need_causal and ctx is not None and not ctx.causal:
        raise ValueError(f"ctx.causal: {method} is a causal (decoder prefill) method; expected True, got False")


def calibrated_layer(method: str, q: Tensor, k: Tensor, ctx, shape, table: dict, source: str) -> int:
    """Checks shared by calibrated per-layer methods: inputs, ``ctx.layer`` present, the calibration's
    model shape matching q/k, and an entry for the layer. Returns the layer index."""
    check_inputs(method, q, k, ctx)
    if ctx.layer is None:
        raise ValueError(f"ctx.layer: {method} needs the layer index (its calibration is per layer), got None")
    shape.check_qk(q, k, ctx.layer, source=source)
    layer = int(ctx.layer)
    if layer not in table:
        raise ValueError(f"ctx.layer: layer {layer} has no entry in the calibration (layers {sorted(table)}); "
                         "refit with this layer captured")
    return layer


def clamp_budget(method: str, name: str, value: int, limit: int) -> int:
    """Clamp a budget to what the context holds, with a warning when it is larger."""
    if value > limit:
        warnings.warn(f"{method}: {name}={value} exceeds what the context holds ({limit}); clamped to {limit}",
                      stacklevel=3)
        return limit
    return value


def restrict_heads(p: BlockPattern, heads: Sequence[int], n_heads: int) -> BlockPattern:
    """Pattern with ``n_heads`` heads: head ``heads[i]`` takes ``p``'s head ``i`` (or its only head),
    every other head is empty. Used to assemble per-head pattern types."""
    heads = [int(h) for h in heads]
    if p.heads not in (1, len(heads)):
        raise ValueError(f"p: expected 1 or {len(heads)} heads, got {p.heads}")
    dev = p.device
    hidx = torch.tensor(heads, dtype=torch.long, device=dev)

    def place(t: Optional[Tensor], fill) -> Optional[Tensor]:
        if t is None:
            return None
        src = t.expand(t.shape[0], len(heads), *t.shape[2:])
        out = torch.full((t.shape[0], n_heads, *t.shape[2:]), fill, dtype=t.dtype, device=dev)
        out[:, hidx] = src
        return out

    cols = None
    if p.columns is not None:
        c = p.columns
        cols = TokenPattern(place(c.indices, 0), place(c.counts, 0), c.kv_len, c.page_size)
    return replace(p, kv_num_blocks=place(p.kv_num_blocks, 0), kv_indices=place(p.kv_indices, 0),
                   full_kv_num_blocks=place(p.full_kv_num_blocks, 0), full_kv_indices=place(p.full_kv_indices, 0),
                   mask_ids=place(p.mask_ids, -1), columns=cols, _cache={})


def merge_heads(parts: Sequence[tuple[Sequence[int], BlockPattern]], n_heads: int) -> BlockPattern:
    """One pattern with ``n_heads`` heads from ``(heads, pattern)`` parts covering disjoint heads
    (same block sizes and lengths); heads not covered by any part are empty."""
    return _merge_heads(parts, n_heads)  # the one per-head merging rule (patterns.merge_heads)


def kv_heads_for(q_heads: Sequence[int], n_q_heads: int, n_kv_heads: int) -> list[int]:
    """The KV head that serves each query head (GQA)."""
    g = n_q_heads // n_kv_heads
    return [int(h) // g for h in q_heads]


def compact_sorted(key: Tensor, keep: Tensor, fill: int = 0) -> tuple[Tensor, Tensor]:
    """The ``keep`` entries of ``key [..., n]`` moved to the front, order kept -> (counts int32
    ``[...]``, int32 ``[..., max(count, 1)]`` padded with ``fill``): BlockPattern lists from
    per-slot key blocks (sorted input gives sorted lists)."""
    counts = keep.sum(-1, dtype=torch.int32)
    n_max = list_width(counts, key.shape[-1])
    out = torch.full((*key.shape[:-1], n_max + 1), fill, dtype=torch.int32, device=key.device)
    if key.shape[-1]:
        slot = torch.where(keep, keep.cumsum(-1) - 1, n_max)
        out.scatter_(-1, slot, key.to(torch.int32))
    return counts.contiguous(), out[..., :n_max].contiguous()


def column_mask_bank(cols: Tensor, block_q: int) -> tuple[Tensor, Tensor]:
    """Distinct key-column masks ``cols`` bool ``[P, block_k]`` -> (bank bool ``[U, block_q, block_k]``
    with each mask repeated over the rows, inverse long ``[P]``). Masks are packed into 64-bit
    words (exact two's complement) before ``torch.unique``."""
    P, bk = cols.shape
    dev = cols.device
    if P == 0:
        return torch.zeros(0, block_q, bk, dtype=torch.bool, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
    w = min(bk, 64)
    W = -(-bk // 64)
    shift = torch.arange(w, device=dev)
    words = (cols.reshape(P, W, w).long() << shift).sum(-1)  # [P, W]
    if W == 1:
        uw, inv = torch.unique(words[:, 0], return_inverse=True)
        uw = uw[:, None]
    else:
        uw, inv = torch.unique(words, dim=0, return_inverse=True)
    rows = ((uw[..., None] >> shift) & 1).bool().reshape(-1, bk)
    return rows[:, None, :].expand(-1, block_q, bk).contiguous(), inv

