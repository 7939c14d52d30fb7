"""Select: shared helpers of the decode methods (query shapes, valid lengths, top-k -> TokenPattern).

Plain torch, no attention computed here: decode methods score tokens cheaply and call these to
turn scores or masks into a ``TokenPattern`` (per (batch, kv head) sorted indices + counts).
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch

from ..kernels.unit_scores.reference import reduce_heads
from ..patterns import TokenPattern, sink_or_recent

Tensor = torch.Tensor


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def decode_inputs(q: Tensor, k: Tensor, ctx) -> tuple[Tensor, Tensor, Tensor]:
    """Check and normalise decode inputs: ``q [B, Hq, D]`` (from ``[B, Hq, 1, D]`` too),
    ``k [B, Hkv, T, D]`` and the valid lengths ``kv_lens [B]`` (``ctx.kv_lens``, default T)."""
    if not isinstance(q, Tensor) or q.dim() not in (3, 4) or (q.dim() == 4 and q.shape[2] != 1):
        raise _err("q", "[B, Hq, D] or [B, Hq, 1, D] (one decode query)", getattr(q, "shape", type(q).__name__))
    if q.dim() == 4:
        q = q[:, :, 0]
    if not isinstance(k, Tensor) or k.dim() != 4:
        raise _err("k", "a KV cache [B, Hkv, T, D]", getattr(k, "shape", type(k).__name__))
    B, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise _err("k", f"batch {B} and head_dim {D} (as q)", tuple(k.shape))
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise _err("k heads", f"a divisor of q's {Hq} heads", k.shape[1])
    T = k.shape[2]
    src = None if ctx is None else ctx.kv_lens
    if src is None:
        return q, k, torch.full((B,), T, dtype=torch.long, device=k.device)
    if torch.compiler.is_compiling():  # a compiled decode step: no check that reads values back (a graph break)
        kl = torch.as_tensor(src, device=k.device).long()
        if kl.shape != (B,):
            raise _err("ctx.kv_lens", f"[B={B}] lengths in [0, {T}]", tuple(kl.shape))
        return q, k, kl
    memo = _CHECKED.get("entry")
    if (memo is not None and isinstance(src, Tensor) and memo[0]() is src and memo[1] == _version(src)
            and memo[2].device == k.device and memo[2].shape == (B,) and memo[3] <= T
            and memo[4] == _version(memo[2])):
        return q, k, memo[2]  # the same lengths tensor as the last call, already checked: no host sync
    kl = torch.as_tensor(src, device=k.device).long()
    if kl.shape != (B,):
        raise _err("ctx.kv_lens", f"[B={B}] lengths in [0, {T}]", tuple(kl.shape))
    lo, hi = torch.stack([kl.min(), kl.max()]).tolist() if B else (0, 0)  # one host sync
    if lo < 0 or hi > T:
        raise _err("ctx.kv_lens", f"[B={B}] lengths in [0, {T}]", kl.tolist())
    if isinstance(src, Tensor) and _version(src) is not None and _version(kl) is not None:
        _CHECKED["entry"] = (weakref.ref(src), _version(src), kl, hi, _version(kl))
    return q, k, kl


def _version(t: Tensor) -> Optional[int]:
    """In-place modification counter of ``t``; None for inference-mode tensors (they keep none, so
    nothing about them is memoised)."""
    return None if t.is_inference() else t._version


# decode_inputs' memo of the last checked lengths tensor: (weakref to the caller's tensor, its version,
# the long tensor returned, its max, that tensor's version). Every layer of a decode step passes the
# same lengths; checking them once per step instead of once per layer saves a host sync per layer.
_CHECKED: dict = {}


def lengths_since(st: Optional[dict], kv_lens: Tensor) -> tuple[bool, int, int]:
    """Rows appended since an incremental per-layer state last recorded its lengths (``record_lengths``).

    Returns ``(usable, start, end)``: ``usable`` = a state exists for this batch and no sequence got
    shorter; rows ``[start, end)`` hold every token appended since (``start`` = the shortest recorded
    length, ``end`` = the longest new one; ``start = 0`` when not usable). One host sync, none when
    ``kv_lens`` is the very tensor (same version) recorded last (then nothing was appended)."""
    if st is not None and st.get("kv_lens") is not None and st["kv_lens"].shape == kv_lens.shape:
        ref = st.get("kv_src")
        if ref is not None and ref[1] is not None and ref[0]() is kv_lens and ref[1] == _version(kv_lens):
            return True, 0, 0
        if not kv_lens.numel():
            return True, 0, 0
        ok, lo, hi = torch.stack([(st["kv_lens"].long() <= kv_lens.long()).all().long(), st["kv_lens"].min().long(),
                                  kv_lens.max().long()]).tolist()
        return bool(ok), (lo if ok else 0), hi
    return False, 0, int(kv_lens.max()) if kv_lens.numel() else 0


def record_lengths(st: dict, kv_lens: Tensor) -> None:
    """Record in an incremental state the lengths it now covers (see ``lengths_since``)."""
    st["kv_lens"] = kv_lens.clone()
    st["kv_src"] = (weakref.ref(kv_lens), _version(kv_lens))


def scale_of(ctx, D: int) -> float:
    return 1.0 / math.sqrt(D) if ctx is None or ctx.scale is None else float(ctx.scale)


def group_scores(q: Tensor, k: Tensor, reduce: str = "max") -> Tensor:
    """Exact ``q·k`` per query head reduced over each GQA group: ``[B, Hkv, T]`` float32."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    qg = q.float().view(B, Hkv, Hq // Hkv, D)
    s = torch.matmul(qg.to(k.dtype), k.transpose(-1, -2)).float()  # [B, Hkv, G, T], no fp32 copy of K
    return reduce_group(s, reduce)


def reduce_group(s: Tensor, reduce: str) -> Tensor:
    """Reduce ``[B, Hkv, G, n]`` scores over the group axis by ``max`` / ``mean`` / ``sum``."""
    if reduce not in ("max", "mean", "sum"):
        raise _err("head_reduce", "'max', 'mean' or 'sum'", repr(reduce))
    return reduce_heads(s, reduce)


def valid_units(kv_lens: Tensor, n_units: int, page_size: int = 1) -> Tensor:
    """bool ``[B, n_units]``: units (tokens or pages) that hold at least one valid token."""
    units = (kv_lens + page_size - 1) // page_size
    return torch.arange(n_units, device=kv_lens.device)[None, :] < units[:, None]


def topk_mask(scores: Tensor, k: int, valid: Tensor) -> Tensor:
    """bool mask ``[B, H, n]`` of the top-``k`` valid entries per row (fewer when fewer are valid)."""
    n = scores.shape[-1]
    k = max(0, min(int(k), n))
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == 0 or n == 0:
        return out
    s = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
    idx = s.topk(k, dim=-1).indices
    out.scatter_(-1, idx, True)
    return out & valid[:, None, :]


def topk_pattern(scores: Tensor, k: int, valid: Tensor, kv_len: int, page_size: int = 1) -> TokenPattern:
    """TokenPattern of the top-``k`` valid units per row of ``scores [B, H, n]`` without a dense
    mask or a host sync: the top-k indices sorted, invalid picks (when fewer than k units are
    valid) moved past ``counts``."""
    B, H, n = scores.shape
    k = max(1, min(int(k), n)) if n else 1
    if n == 0:
        z = torch.zeros(B, H, 1, dtype=torch.int32, device=scores.device)
        return TokenPattern(z, torch.zeros(B, H, dtype=torch.int32, device=scores.device), kv_len, page_size)
    s = scores.masked_fill(~valid[:, None, :], float("-inf"))
    top = s.topk(k, dim=-1, sorted=False)  # the picks are sorted by position below, not by score
    ok = torch.isfinite(top.values) | (top.values == float("inf"))
    ok = ok & torch.gather(valid[:, None, :].expand(B, H, n), 2, top.indices)
    key = torch.where(ok, top.indices, top.indices + n)
    idx = key.sort(-1).values
    idx = torch.where(idx >= n, torch.zeros_like(idx), idx)
    return TokenPattern(idx.to(torch.int32).contiguous(), ok.sum(-1).to(torch.int32), kv_len, page_size)


def sink_window_mask(B: int, H: int, T: int, kv_lens: Tensor, n_sink: int, window: int) -> Tensor:
    """bool ``[B, H, T]``: the first ``n_sink`` and the last ``window`` valid tokens of each sequence."""
    t = torch.arange(T, device=kv_lens.device)[None, :]
    L = kv_lens[:, None]
    m = sink_or_recent(t, L, n_sink, window) & (t < L)  # the one sink + recent-window rule
    return m[:, None, :].expand(B, H, T)


def mask_to_pattern(mask: Tensor, kv_len: int, page_size: int = 1) -> TokenPattern:
    """TokenPattern from a bool unit mask ``[B, H, n_units]``."""
    return TokenPattern.from_mask(mask.contiguous(), page_size=page_size, kv_len=kv_len)


def full_pattern(B: int, H: int, kv_lens: Tensor, T: int) -> TokenPattern:
    """Every valid token of each sequence (dense decode expressed as a pattern)."""
    return mask_to_pattern(valid_units(kv_lens, T)[:, None, :].expand(B, H, T), T)


__all__ = ["decode_inputs", "lengths_since", "record_lengths", "scale_of", "group_scores", "reduce_group",
           "valid_units", "topk_mask", "sink_window_mask", "mask_to_pattern", "full_pattern", "topk_pattern"]
