"""Patterns: static constructors (dense, causal, sliding window, sink + local, dilated, strided shards,
vertical-slash, neighborhood 1D/2D/3D)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Sequence

import torch

from ._util import Tensor, _cdiv, _err
from .block import BlockPattern
from .conversions import from_block_mask
from .predicates import (_check_lengths, _expand_bh, _from_predicate, from_predicate, sink_window_mask,
                         sliding_window_mask)
from .token import TokenPattern


def _every_pair(q_len, kv_len, block_q, block_k, is_causal, batch, heads, device) -> BlockPattern:
    """Every key block (under the bottom-right aligned causal bound when ``is_causal``)."""
    kv_len, block_k = _check_lengths(q_len, kv_len, block_q, block_k)
    t = lambda r0, r1, c0, c1: torch.ones(r0.shape[0], c0.shape[1], dtype=torch.bool, device=device)  # noqa: E731
    p = _from_predicate(lambda r, c: torch.ones(r.shape[0], r.shape[1], c.shape[2], dtype=torch.bool, device=device),
                        t, t, q_len, kv_len, block_q, block_k, is_causal, device)
    return _expand_bh(p, batch, heads)


def dense(q_len: int, kv_len: Optional[int] = None, *, block_q: int = 128, block_k: Optional[int] = None,
          batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """dense: every key block for every query block (non-causal)."""
    return _every_pair(q_len, kv_len, block_q, block_k, False, batch, heads, device)


def causal(q_len: int, kv_len: Optional[int] = None, *, block_q: int = 128, block_k: Optional[int] = None,
           batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """causal: every key block on or below the (bottom-right aligned) diagonal; diagonal blocks partial."""
    return _every_pair(q_len, kv_len, block_q, block_k, True, batch, heads, device)


def sliding_window(q_len: int, window: int, kv_len: Optional[int] = None, *, causal: bool = True,
                   block_q: int = 128, block_k: Optional[int] = None, batch: int = 1, heads: int = 1,
                   device=None) -> BlockPattern:
    """sliding_window: query i sees keys j with ``0 <= (i + off) - j < window`` (causal), or
    ``|i + off - j| < window`` when ``causal=False`` (symmetric window), ``off = kv_len - q_len``."""
    kv_len, block_k = _check_lengths(q_len, kv_len, block_q, block_k)
    if not isinstance(window, int) or window < 1:
        raise _err("window", "an int >= 1", window)
    return from_predicate(sliding_window_mask(window, causal=causal), q_len, kv_len, causal=causal,
                          block_q=block_q, block_k=block_k, batch=batch, heads=heads, device=device)


def sink_local(q_len: int, sink: int, window: int, kv_len: Optional[int] = None, *, block_q: int = 128,
               block_k: Optional[int] = None, batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """sink_local (A-shape, StreamingLLM / MInference): the first ``sink`` keys plus a causal
    sliding window of ``window`` keys."""
    kv_len, block_k = _check_lengths(q_len, kv_len, block_q, block_k)
    if not isinstance(sink, int) or sink < 0:
        raise _err("sink", "an int >= 0", sink)
    if not isinstance(window, int) or window < 1:
        raise _err("window", "an int >= 1", window)
    return from_predicate(sink_window_mask(sink, window), q_len, kv_len, causal=True, block_q=block_q,
                          block_k=block_k, batch=batch, heads=heads, device=device)


a_shape = sink_local


def dilated(q_len: int, dilation: int, window_blocks: Optional[int] = None, kv_len: Optional[int] = None, *,
            causal: bool = True, local_blocks: int = 1, block_q: int = 128, block_k: Optional[int] = None,
            batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """dilated: block-level dilation (LongNet-style, at kernel granularity): a query block sees every
    ``dilation``-th key block counted back from its diagonal (within ``window_blocks`` blocks if
    given) plus its ``local_blocks`` nearest blocks."""
    kv_len, block_k = _check_lengths(q_len, kv_len, block_q, block_k)
    if not isinstance(dilation, int) or dilation < 1:
        raise _err("dilation", "an int >= 1", dilation)
    if window_blocks is not None and (not isinstance(window_blocks, int) or window_blocks < 1):
        raise _err("window_blocks", "None or an int >= 1", window_blocks)
    if not isinstance(local_blocks, int) or local_blocks < 1:
        raise _err("local_blocks", "an int >= 1", local_blocks)
    nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    dev = device
    qb = torch.arange(nq, device=dev)[:, None]
    kb = torch.arange(nk, device=dev)[None, :]
    diag = ((qb * block_q + (kv_len - q_len)) // block_k)  # key block holding the diagonal of the first row
    dist = diag - kb
    sel = (dist.abs() < local_blocks) | (dist % dilation == 0)
    if causal:
        sel = sel & (dist >= -((block_q - 1) // block_k + 1))
    if window_blocks is not None:
        sel = sel & (dist.abs() < window_blocks)
    p = from_block_mask(sel[None, None], block_size=(block_q, block_k), q_len=q_len, kv_len=kv_len, causal=causal)
    return _expand_bh(p, batch, heads)


def strided_shards(q_len: int, heads: int, *, vert_stride: int = 8, local_blocks: int = 16,
                   kv_len: Optional[int] = None, head_offsets: Optional[Sequence[int]] = None,
                   block_size: int = 64, causal: bool = True, batch: int = 1, device=None) -> BlockPattern:
    """strided_shards (S2-Attention, arXiv 2407.17678): each head sees its ``local_blocks`` nearest key
    blocks plus every ``vert_stride``-th block with a head-specific offset; the offsets rotate
    across heads so that the union over heads covers every block of the context."""
    kv_len, _ = _check_lengths(q_len, kv_len, block_size, None)
    if not isinstance(heads, int) or heads < 1:
        raise _err("heads", "an int >= 1", heads)
    if not isinstance(vert_stride, int) or vert_stride < 1:
        raise _err("vert_stride", "an int >= 1", vert_stride)
    if not isinstance(local_blocks, int) or local_blocks < 0:
        raise _err("local_blocks", "an int >= 0", local_blocks)
    if head_offsets is None:  # DKernel: head_sliding_step = max(1, vert_stride // heads)
        step = max(1, vert_stride // heads)
        head_offsets = [(h * step) % vert_stride for h in range(heads)]
    if len(head_offsets) != heads:
        raise _err("head_offsets", f"{heads} values", len(head_offsets))
    nq, nk = _cdiv(q_len, block_size), _cdiv(kv_len, block_size)
    qb = torch.arange(nq, device=device)[:, None]
    kb = torch.arange(nk, device=device)[None, :]
    diag = (qb * block_size + (kv_len - q_len)) // block_size
    offs = torch.tensor(list(head_offsets), device=device)[:, None, None]
    sel = ((diag - kb)[None] < local_blocks) & ((diag - kb)[None] >= 0) | (((kb[None] + offs) % vert_stride) == 0)
    if not causal:
        sel = sel | (((diag - kb).abs() < local_blocks)[None])
    return _expand_bh(from_block_mask(sel[None], block_size=block_size, q_len=q_len, kv_len=kv_len, causal=causal),
                      batch, heads)


def vertical_slash(q_len: int, vertical: Tensor, slash: Tensor, kv_len: Optional[int] = None, *,
                   vertical_counts: Optional[Tensor] = None, slash_counts: Optional[Tensor] = None,
                   block_size: int = 64) -> BlockPattern:
    """vertical_slash (MInference, arXiv 2407.02490): key columns (vertical lines) plus diagonals
    (slash lines) per head, causal.

    Args:
        vertical: int ``[B, H, nv]``: key indices of vertical lines (any order; duplicates merged).
        slash: int ``[B, H, ns]``: diagonal offsets ``d = (i + off) - j >= 0`` of slash lines.
        vertical_counts, slash_counts: optional ``[B, H]`` numbers of valid entries (default all).
            Each of these four may also be a NumPy array or nested Python lists of ints.
        block_size: slash lines are covered by the key blocks they cross (block granularity,
            as MInference's kernel); verticals go through the column path exactly.
    """
    kv_len, _ = _check_lengths(q_len, kv_len, block_size, None)
    dev0 = next((t.device for t in (vertical, slash) if isinstance(t, Tensor)), None)
    vertical = _int_tensor("vertical", vertical, dev0)
    slash = _int_tensor("slash", slash, dev0)
    vertical_counts = None if vertical_counts is None else _int_tensor("vertical_counts", vertical_counts, dev0)
    slash_counts = None if slash_counts is None else _int_tensor("slash_counts", slash_counts, dev0)
    if vertical.dim() != 3:
        raise _err("vertical", "an int tensor [B, H, nv]", tuple(vertical.shape))
    if slash.dim() != 3 or slash.shape[:2] != vertical.shape[:2]:
        raise _err("slash", f"an int tensor [{vertical.shape[0]}, {vertical.shape[1]}, ns]", tuple(slash.shape))
    dev = vertical.device
    B, H = vertical.shape[:2]
    nq, nk = _cdiv(q_len, block_size), _cdiv(kv_len, block_size)
    off = kv_len - q_len
    ns = slash.shape[-1]
    s_valid = torch.ones_like(slash, dtype=torch.bool) if slash_counts is None else \
        torch.arange(ns, device=dev) < slash_counts[..., None]
    s = slash.long()
    if ((s < 0) | (s > q_len + off))[s_valid].any():
        raise _err("slash", f"diagonal offsets in [0, {q_len + off}]", "an offset out of range")
    # a diagonal d crosses, for query block qb, key columns [r0+off-d, r1+off-d]
    qb = torch.arange(nq, device=dev)
    r0 = qb * block_size
    r1 = torch.clamp((qb + 1) * block_size, max=q_len) - 1
    c_lo = (r0[None, None, :, None] + off - s[:, :, None, :])  # [B,H,nq,ns]
    c_hi = (r1[None, None, :, None] + off - s[:, :, None, :])
    c_lo = c_lo.clamp(min=0)
    ok = (c_hi >= 0) & (c_lo < kv_len) & s_valid[:, :, None, :]
    kb_lo = (c_lo // block_size).clamp(max=nk - 1)
    kb_hi = (c_hi.clamp(max=kv_len - 1) // block_size).clamp(min=0)
    sel = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=dev)
    drop = torch.full_like(kb_lo, nk)
    sel.scatter_(-1, torch.where(ok, kb_lo, drop), True)
    sel.scatter_(-1, torch.where(ok, kb_hi, drop), True)
    sel = sel[..., :nk]
    nv = vertical.shape[-1]
    v_valid = torch.ones_like(vertical, dtype=torch.bool) if vertical_counts is None else \
        torch.arange(nv, device=dev) < vertical_counts[..., None]
    v = vertical.long()
    if ((v < 0) | (v >= kv_len))[v_valid].any():
        raise _err("vertical", f"key indices in [0, {kv_len})", "an index out of range")
    vm = torch.zeros(B, H, kv_len + 1, dtype=torch.bool, device=dev)
    vm.scatter_(-1, torch.where(v_valid, v, torch.full_like(v, kv_len)), True)
    columns = TokenPattern.from_mask(vm[..., :kv_len], kv_len=kv_len)
    p = from_block_mask(sel, block_size=block_size, q_len=q_len, kv_len=kv_len, causal=True)
    return replace(p, columns=columns, _cache={})


def _int_tensor(name: str, x, device) -> Tensor:
    """An integer tensor from a tensor, a NumPy array or (nested) Python lists/tuples of ints."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise _err(name, "an integer tensor (or nested lists of ints)", f"{type(x).__name__} ({e})") from None
        if x.numel() == 0:  # torch.as_tensor([]) is float
            x = x.long()
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise _err(name, "an integer tensor (or nested lists of ints)", x.dtype)
    return x


def _neighborhood_window(pos: Tensor, n: int, k: int, dilation: int, is_causal: bool):
    """Start of the (clamped) neighborhood window of each position along one axis (NATTEN semantics)."""
    if is_causal:
        return pos - (k - 1) * dilation  # may be negative: positions < 0 are excluded by the caller
    # within each dilation group the positions form a sequence of length ceil((n - g)/dilation)
    g = pos % dilation
    idx = pos // dilation
    length = (n - g + dilation - 1) // dilation
    start = torch.clamp(idx - k // 2, min=0)
    start = torch.minimum(start, torch.clamp(length - k, min=0))
    return start * dilation + g


def _neighborhood_pred(rows: Tensor, cols: Tensor, shape: Sequence[int], kernel: Sequence[int],
                       dilation: Sequence[int], is_causal: Sequence[bool]) -> Tensor:
    ok = torch.ones(torch.broadcast_shapes(rows.shape, cols.shape), dtype=torch.bool, device=rows.device)
    rem_r, rem_c = rows, cols
    strides = [int(math.prod(shape[a + 1:])) for a in range(len(shape))]
    for a in range(len(shape)):
        pr = (rem_r // strides[a]) % shape[a]
        pc = (rem_c // strides[a]) % shape[a]
        start = _neighborhood_window(pr, shape[a], kernel[a], dilation[a], is_causal[a])
        d = pc - start
        okax = (d >= 0) & (d % dilation[a] == 0) & (d // dilation[a] < kernel[a]) & (pc % dilation[a] == pr % dilation[a])
        if is_causal[a]:
            okax = okax & (pc <= pr)
        ok = ok & okax
    return ok


def _neighborhood(shape: Sequence[int], kernel, dilation, is_causal, block_size, batch, heads, device):
    nd = len(shape)
    kernel = [kernel] * nd if isinstance(kernel, int) else list(kernel)
    dilation = [dilation] * nd if isinstance(dilation, int) else list(dilation)
    is_causal = [is_causal] * nd if isinstance(is_causal, bool) else list(is_causal)
    for name, vals in (("kernel_size", kernel), ("dilation", dilation)):
        if len(vals) != nd or any(not isinstance(v, int) or v < 1 for v in vals):
            raise _err(name, f"{nd} ints >= 1", vals)
    for a in range(nd):
        if kernel[a] * dilation[a] > shape[a]:
            raise _err("kernel_size", f"kernel_size * dilation <= {shape[a]} on axis {a}", kernel[a] * dilation[a])
    n = int(math.prod(shape))
    kv_len, block_k = _check_lengths(n, n, block_size, None)
    pred = lambda r, c: _neighborhood_pred(r, c, shape, kernel, dilation, is_causal)  # noqa: E731
    # block-level any: evaluate exactly on the blocks (n is moderate for vision / 1D NA use)
    nb = _cdiv(n, block_size)
    anyb = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    fullb = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    ar = torch.arange(block_size, device=device)
    for qb in range(nb):
        rows = (qb * block_size + ar)[:, None]
        cols = torch.arange(nb * block_size, device=device)[None, :]
        m = pred(rows, cols) & (rows < n) & (cols < n)
        mb = m.view(block_size, nb, block_size)
        anyb[qb] = mb.any(0).any(-1)
        valid = ((rows < n) & (cols < n)).view(block_size, nb, block_size)
        fullb[qb] = (mb | ~valid).all(0).all(-1) & anyb[qb]
    p = _from_predicate(pred, lambda *a: fullb, lambda *a: anyb, n, n, block_size, block_size, False, device)
    return _expand_bh(p, batch, heads)


def neighborhood_1d(length: int, kernel_size: int, *, dilation: int = 1, causal: bool = False,
                    block_size: int = 64, batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """neighborhood_1d (Neighborhood Attention / NATTEN, arXiv 2403.04690): each query sees
    ``kernel_size`` keys spaced by ``dilation`` around it, the window clamped inward at the edges
    (causal: the latest ``kernel_size`` dilated positions up to itself)."""
    if not isinstance(length, int) or length < 1:
        raise _err("length", "an int >= 1", length)
    return _neighborhood([length], kernel_size, dilation, causal, block_size, batch, heads, device)


def neighborhood_2d(height: int, width: int, kernel_size, *, dilation=1, causal=False, block_size: int = 64,
                    batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """neighborhood_2d (Neighborhood Attention / NATTEN, arXiv 2403.04690) on a row-major
    ``height x width`` token grid; ``kernel_size``, ``dilation``, ``causal`` per axis or shared."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < 1:
            raise _err(name, "an int >= 1", v)
    return _neighborhood([height, width], kernel_size, dilation, causal, block_size, batch, heads, device)


def neighborhood_3d(depth: int, height: int, width: int, kernel_size, *, dilation=1, causal=False,
                    block_size: int = 64, batch: int = 1, heads: int = 1, device=None) -> BlockPattern:
    """neighborhood_3d (Neighborhood Attention / NATTEN, arXiv 2403.04690) on a row-major
    ``depth x height x width`` token grid; ``kernel_size``, ``dilation``, ``causal`` per axis or shared."""
    for name, v in (("depth", depth), ("height", height), ("width", width)):
        if not isinstance(v, int) or v < 1:
            raise _err(name, "an int >= 1", v)
    return _neighborhood([depth, height, width], kernel_size, dilation, causal, block_size, batch, heads, device)
