"""Patterns: the predicate builder -- a structured pattern from element/block predicates."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from ._util import Tensor, _cdiv, _err
from .algebra import _assemble
from .block import BlockPattern
from .token import TokenPattern


def _check_lengths(q_len, kv_len, block_q, block_k):
    if not isinstance(q_len, int) or q_len < 0:
        raise _err("q_len", "an int >= 0", q_len)
    if kv_len is None:
        kv_len = q_len
    if not isinstance(kv_len, int) or kv_len < 0:
        raise _err("kv_len", "an int >= 0", kv_len)
    if block_k is None:
        block_k = block_q
    for name, v in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise _err(name, "a power of two >= 16", v)
    return kv_len, block_k


def _block_grid(q_len, kv_len, bq, bk, device):
    """Per (qb, kb): first/last row index and first/last key index (clipped to lengths)."""
    nq, nk = _cdiv(q_len, bq), _cdiv(kv_len, bk)
    qb = torch.arange(nq, device=device)
    kb = torch.arange(nk, device=device)
    r0 = (qb * bq)[:, None]
    r1 = torch.clamp((qb + 1) * bq, max=q_len)[:, None] - 1
    c0 = (kb * bk)[None, :]
    c1 = torch.clamp((kb + 1) * bk, max=kv_len)[None, :] - 1
    return r0, r1, c0, c1


def _from_predicate(pred: Callable[[Tensor, Tensor], Tensor], full_pred: Callable, any_pred: Callable,
                    q_len: int, kv_len: int, bq: int, bk: int, is_causal: bool, device,
                    columns: Optional[TokenPattern] = None, heads: int = 1) -> BlockPattern:
    """Generic builder for structured patterns.

    ``any_pred(r0, r1, c0, c1)`` -> bool [(H,) nq, nk]: the block may contain a kept pair;
    ``full_pred(r0, r1, c0, c1)`` -> bool: every pair of the block is kept by ``pred`` (causality
    and bounds are added here); ``pred(rows, cols)`` -> bool element predicate on broadcast
    index tensors (rows [P, bq, 1], cols [P, 1, bk], and a head index tensor for per-head patterns).
    """
    r0, r1, c0, c1 = _block_grid(q_len, kv_len, bq, bk, device)
    off = kv_len - q_len
    anyb = any_pred(r0, r1, c0, c1)
    fullb = full_pred(r0, r1, c0, c1)
    if is_causal:
        anyb = anyb & (c0 <= r1 + off)
        fullb = fullb & (c1 <= r0 + off)
    if anyb.dim() == 2:
        anyb, fullb = anyb[None], fullb[None]
    anyb = anyb[None].expand(1, anyb.shape[0], -1, -1)
    fullb = (fullb[None].expand_as(anyb)) & anyb
    part = anyb & ~fullb
    b, h, q, k = part.nonzero(as_tuple=True)
    tiles = None
    if b.numel():
        rows = q[:, None, None] * bq + torch.arange(bq, device=device)[None, :, None]
        cols = k[:, None, None] * bk + torch.arange(bk, device=device)[None, None, :]
        tiles = pred(rows, cols, h[:, None, None]) if _takes_head(pred) else pred(rows, cols)
    return _assemble(fullb, part, (b, h, q, k), tiles, bq, bk, q_len, kv_len, is_causal, columns)


def _takes_head(fn) -> bool:
    import inspect

    try:
        return len(inspect.signature(fn).parameters) >= 3
    except (TypeError, ValueError):
        return False


def _expand_bh(p: BlockPattern, batch: int, heads: int) -> BlockPattern:
    if batch == p.batch and heads == p.heads:
        return p
    ex = lambda t: None if t is None else t.expand(batch, heads, *t.shape[2:]).contiguous()  # noqa: E731
    return replace(p, kv_num_blocks=ex(p.kv_num_blocks), kv_indices=ex(p.kv_indices),
                   full_kv_num_blocks=ex(p.full_kv_num_blocks), full_kv_indices=ex(p.full_kv_indices),
                   mask_ids=ex(p.mask_ids), _cache={})


# ----------------------------------------------------------------------------------------------
# Public composable predicates (in the style of attention-gym's mask_mods)
# ----------------------------------------------------------------------------------------------


def sink_or_recent(pos: Tensor, length, n_sink, window) -> Tensor:
    """sink_or_recent: the sink + recent-window rule (StreamingLLM, arXiv 2309.17453), written once.

    Position ``pos`` is kept iff it is one of the first ``n_sink`` positions or one of the last
    ``window`` positions before ``length`` (``pos >= length - window``). Broadcasts over tensors;
    callers add their own validity bound (``pos < length``, ``pos >= 0``). For a query at
    (bottom-right aligned) position ``q`` in prefill, ``length = q + 1`` gives ``q - pos < window``.
    """
    return (pos < n_sink) | (pos >= length - window)


@dataclass(frozen=True)
class Mask:
    """Mask: a composable element predicate with block bounds, the unit of ``from_predicate``.

    ``elem(q, k)`` (or ``elem(q, k, h)`` for per-head masks) -> bool on broadcast index tensors, where
    ``q`` is the query's position bottom-right aligned to the keys (``i + kv_len - q_len``, so causal is
    ``k <= q``) and ``k`` the key index. ``any(q0, q1, k0, k1)`` -> bool per block: the block may hold a
    kept pair (a superset is allowed: extra blocks get exact element tiles); ``full(q0, q1, k0, k1)`` ->
    bool per block: every pair is kept (a subset is allowed). Bounds take ``[nq, 1]`` row and ``[1, nk]``
    column tensors of first/last aligned query position and first/last key. Without ``any``/``full``
    the block bounds are computed exactly from ``elem`` on every pair (O(q_len * kv_len) memory).
    """

    elem: Callable
    any: Optional[Callable] = None
    full: Optional[Callable] = None


def mask_mod(elem: Callable, *, any: Optional[Callable] = None, full: Optional[Callable] = None) -> Mask:
    """mask_mod: wrap an element predicate ``elem(q, k[, h])`` (and optional block bounds) as a ``Mask``."""
    if not callable(elem):
        raise _err("elem", "a callable elem(q, k[, h]) -> bool tensor", type(elem))
    return Mask(elem, any, full)


def _as_mask(m, name: str) -> Mask:
    if isinstance(m, Mask):
        return m
    if callable(m):
        return Mask(m)
    raise _err(name, "a Mask or a callable elem(q, k[, h])", type(m))


def _call_elem(m: Mask, q, k, h):
    return m.elem(q, k, h) if _takes_head(m.elem) else m.elem(q, k)


def _combine(masks, op: str) -> Mask:
    """The mask keeping pairs kept by every (``op="and"``) or some (``"or"``) mask; block bounds
    combine the same way (any with any, full with full)."""
    ms = [_as_mask(m, f"masks[{i}]") for i, m in enumerate(masks)]
    if not ms:
        raise _err("masks", "at least one mask", 0)

    def elem(q, k, h=None):
        return _reduce([_call_elem(m, q, k, h) for m in ms], op)

    elem = _head_arity(elem, ms)
    bounded = all(m.any is not None and m.full is not None for m in ms)
    return Mask(elem,
                (lambda *b: _reduce([m.any(*b) for m in ms], op)) if bounded else None,
                (lambda *b: _reduce([m.full(*b) for m in ms], op)) if bounded else None)


def and_(*masks) -> Mask:
    """and_: the pairs kept by every mask (block bounds: any = all anys, full = all fulls)."""
    return _combine(masks, "and")


def or_(*masks) -> Mask:
    """or_: the pairs kept by any mask (block bounds: any = some any, full = some full)."""
    return _combine(masks, "or")


def not_(mask) -> Mask:
    """not_: the pairs a mask drops (any = not full, full = not any)."""
    m = _as_mask(mask, "mask")
    bounded = m.any is not None and m.full is not None
    return Mask(_head_arity(lambda q, k, h=None: ~_call_elem(m, q, k, h), [m]),
                (lambda *b: ~m.full(*b)) if bounded else None,
                (lambda *b: ~m.any(*b)) if bounded else None)


def _head_arity(fn, ms):
    """``fn`` as a per-head ``elem(q, k, h)`` when any of ``ms`` is per-head, else ``elem(q, k)``."""
    if any(_takes_head(m.elem) for m in ms):
        return lambda q, k, h: fn(q, k, h)
    return lambda q, k: fn(q, k)


def _reduce(ts, op):
    out = ts[0]
    for t in ts[1:]:
        out = (out & t) if op == "and" else (out | t)
    return out


def causal_mask() -> Mask:
    """causal_mask: key ``k`` at or before the (bottom-right aligned) query position ``q``."""
    return Mask(lambda q, k: k <= q, lambda q0, q1, k0, k1: k0 <= q1, lambda q0, q1, k0, k1: k1 <= q0)


def sliding_window_mask(window: int, *, causal: bool = True) -> Mask:
    """sliding_window_mask: ``0 <= q - k < window`` (``causal``) or ``|q - k| < window`` (symmetric).

    With ``causal`` the lower bound ``k <= q`` comes from ``from_predicate(causal=True)``; the mask
    itself only bounds how far back a key may be."""
    if not isinstance(window, int) or window < 1:
        raise _err("window", "an int >= 1", window)
    if causal:
        return Mask(lambda q, k: (q - k) < window, lambda q0, q1, k0, k1: (q0 - k1) < window,
                    lambda q0, q1, k0, k1: (q1 - k0) < window)
    return Mask(lambda q, k: (q - k).abs() < window,
                lambda q0, q1, k0, k1: ((q0 - k1) < window) & ((k0 - q1) < window),
                lambda q0, q1, k0, k1: ((q1 - k0) < window) & ((k1 - q0) < window))


def sink_mask(sink: int) -> Mask:
    """sink_mask: the first ``sink`` keys (attention sinks, StreamingLLM, arXiv 2309.17453)."""
    if not isinstance(sink, int) or sink < 0:
        raise _err("sink", "an int >= 0", sink)
    return Mask(lambda q, k: k < sink, lambda q0, q1, k0, k1: k0 < sink, lambda q0, q1, k0, k1: k1 < sink)


def sink_window_mask(sink: int, window: int) -> Mask:
    """sink_window_mask: the first ``sink`` keys plus the last ``window`` keys up to the query
    (the rule of ``sink_or_recent`` with ``length = q + 1``; use with ``causal=True``)."""
    if not isinstance(sink, int) or sink < 0:
        raise _err("sink", "an int >= 0", sink)
    if not isinstance(window, int) or window < 1:
        raise _err("window", "an int >= 1", window)
    return Mask(lambda q, k: sink_or_recent(k, q + 1, sink, window),
                lambda q0, q1, k0, k1: (k0 < sink) | (k1 >= q0 + 1 - window),  # some pair kept
                lambda q0, q1, k0, k1: (k1 < sink) | (k0 >= q1 + 1 - window))  # every pair kept


def from_predicate(mask, q_len: int, kv_len: Optional[int] = None, *, causal: bool = False, block_q: int = 128,
                   block_k: Optional[int] = None, batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """from_predicate: the BlockPattern of a ``Mask`` (or a plain ``elem(q, k[, h])`` callable).

    Blocks where the mask keeps every pair are full, blocks where it keeps some are partial with an
    exact element tile (deduplicated into the mask bank), the rest are skipped; ``causal`` adds the
    bottom-right aligned causal bound. A per-head ``elem(q, k, h)`` gets ``heads`` distinct heads
    (its block bounds, if given, must return ``[heads, nq, nk]``); otherwise the pattern is expanded
    to ``(batch, heads)``. Example: ``from_predicate(or_(sink_mask(4), sliding_window_mask(256)), T,
    causal=True, block_q=64)`` equals ``sink_local(T, 4, 256, block_q=64)``.
    """
    kv_len, block_k = _check_lengths(q_len, kv_len, block_q, block_k)
    for name, v in (("batch", batch), ("heads", heads)):
        if not isinstance(v, int) or v < 1:
            raise _err(name, "an int >= 1", v)
    m = _as_mask(mask, "mask")
    off = kv_len - q_len
    per_head = _takes_head(m.elem)
    H = heads if per_head else 1

    def pred(r, c, h=None):
        q = r + off
        if per_head:
            return m.elem(q, c, h)
        return m.elem(q, c)

    if m.any is not None and m.full is not None:
        anyp = lambda r0, r1, c0, c1: m.any(r0 + off, r1 + off, c0, c1)  # noqa: E731
        fullp = lambda r0, r1, c0, c1: m.full(r0 + off, r1 + off, c0, c1)  # noqa: E731
    else:
        rows = torch.arange(q_len, device=device)[:, None]
        cols = torch.arange(kv_len, device=device)[None, :]
        if per_head:
            hs = torch.arange(H, device=device)[:, None, None]
            el = torch.as_tensor(pred(rows[None], cols[None], hs)).expand(H, q_len, kv_len)
        else:
            el = torch.as_tensor(pred(rows, cols)).expand(q_len, kv_len)[None]
        nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
        pad = torch.nn.functional.pad
        kept = pad(el, (0, nk * block_k - kv_len, 0, nq * block_q - q_len), value=False)
        inb = pad(torch.ones_like(el[:1]), (0, nk * block_k - kv_len, 0, nq * block_q - q_len), value=False)
        if causal:
            causal_el = pad((cols <= rows + off)[None], (0, nk * block_k - kv_len, 0, nq * block_q - q_len),
                            value=False)
            inb = inb & causal_el
        kept = kept & inb
        blk = lambda t: t.view(t.shape[0], nq, block_q, nk, block_k)  # noqa: E731
        anyb = blk(kept).any(4).any(2)
        fullb = (blk(kept) | ~blk(inb)).all(4).all(2)
        if not per_head:
            anyb, fullb = anyb[0], fullb[0]
        anyp = lambda r0, r1, c0, c1: anyb  # noqa: E731
        fullp = lambda r0, r1, c0, c1: fullb  # noqa: E731
    el_pred = pred if per_head else (lambda r, c: pred(r, c))
    p = _from_predicate(el_pred, fullp, anyp, q_len, kv_len, block_q, block_k, causal, device, heads=H)
    return _expand_bh(p, batch, heads)
