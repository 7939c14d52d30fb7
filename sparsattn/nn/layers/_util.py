"""Shared helpers of the sparse layers: argument checks, q/k/v projections, head split/merge,
region (block-major) token orders and block patterns with a padding tile."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import patterns as P
from ...patterns import BlockPattern


def check_int(name: str, v, lo: int = 1) -> int:
    """``v`` as an int >= ``lo`` or a ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    return v


def check_float(name: str, v, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """``v`` as a float in the interval or a ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name}: expected a number in {lb}{lo}, {hi}{rb}, got {v!r}")
    return float(v)


def check_bool(name: str, v) -> bool:
    """``v`` as a bool or a ValueError naming ``name``."""
    if not isinstance(v, bool):
        raise ValueError(f"{name}: expected True or False, got {v!r}")
    return v


def check_dim_heads(dim, heads) -> tuple[int, int]:
    """Validate the model width and head count (``dim`` a multiple of ``heads``)."""
    check_int("dim", dim)
    check_int("heads", heads)
    if dim % heads:
        raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
    return dim, heads


def check_input(x, ndim: int, dim: int, what: str) -> None:
    """``x`` must be a floating tensor of ``ndim`` dims whose last is ``dim``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor {what}, got {type(x).__name__}"
                         f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
    if x.dim() != ndim or x.shape[-1] != dim:
        raise ValueError(f"x: expected shape {what} with dim={dim}, got {tuple(x.shape)}")


def next_pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo) (the kernels' block sizes)."""
    p = lo
    while p < n:
        p *= 2
    return p


class QKVOut(nn.Module):
    """Fused q/k/v projection (bias optional) and the output projection (with bias) of the layers."""

    def __init__(self, dim: int, heads: int, qk_dim: Optional[int] = None, shared_qk: bool = False,
                 bias: bool = False):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.qk_dim = dim if qk_dim is None else qk_dim
        self.shared_qk = shared_qk
        n_qk = self.qk_dim if shared_qk else 2 * self.qk_dim
        self.qkv = nn.Linear(dim, n_qk + dim, bias=bias)
        self.out = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor):
        """x ``[B, N, dim]`` -> q, k, v ``[B, heads, N, d]`` (q is k when ``shared_qk``)."""
        B, N, _ = x.shape
        h = self.heads
        y = self.qkv(x)
        if self.shared_qk:
            qk, v = y.split([self.qk_dim, self.dim], -1)
            q = k = qk.view(B, N, h, -1).transpose(1, 2)
        else:
            q, k, v = y.split([self.qk_dim, self.qk_dim, self.dim], -1)
            q = q.view(B, N, h, -1).transpose(1, 2)
            k = k.view(B, N, h, -1).transpose(1, 2)
        v = v.view(B, N, h, -1).transpose(1, 2)
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """o ``[B, heads, N, d]`` -> ``[B, N, dim]`` through the output projection."""
        B, h, N, d = o.shape
        return self.out(o.transpose(1, 2).reshape(B, N, h * d))


def same_dtype(*ts):
    """Cast tensors to the first one's dtype (autocast may leave mixed fp32/bf16 tensors)."""
    dt = ts[0].dtype
    return tuple(t if t.dtype == dt else t.to(dt) for t in ts)


def region_order(H: int, W: int, rh: int, rw: int, device) -> tuple[torch.Tensor, int, int]:
    """Token order grouping an ``H x W`` grid (padded up to multiples of ``rh x rw``) into
    ``rh x rw`` regions, region-major, each region row-major.

    Returns ``(src [nR * rh * rw], nRh, nRw)``: ``src[i]`` is the row-major index of the grid
    token at region-major slot ``i``, or ``-1`` for a padding slot."""
    nRh, nRw = -(-H // rh), -(-W // rw)
    r = torch.arange(nRh * rh, device=device)
    c = torch.arange(nRw * rw, device=device)
    rr = r.view(nRh, 1, rh, 1).expand(nRh, nRw, rh, rw)
    cc = c.view(1, nRw, 1, rw).expand(nRh, nRw, rh, rw)
    src = torch.where((rr < H) & (cc < W), rr * W + cc, torch.full_like(rr, -1))
    return src.reshape(-1), nRh, nRw


def gather_slots(x: torch.Tensor, src: torch.Tensor, slot: int, block: int) -> torch.Tensor:
    """``x [B, N, C]`` -> ``[B, nR * block, C]``: region slots of ``slot`` tokens each (``src`` as
    from ``region_order``), each region padded with zeros to ``block`` tokens."""
    B, N, C = x.shape
    nR = src.numel() // slot
    xp = torch.cat([x, x.new_zeros(B, 1, C)], 1)
    idx = torch.where(src >= 0, src, torch.full_like(src, N))
    g = xp[:, idx].view(B, nR, slot, C)
    if block > slot:
        g = torch.cat([g, g.new_zeros(B, nR, block - slot, C)], 2)
    return g.reshape(B, nR * block, C)


def scatter_slots(y: torch.Tensor, src: torch.Tensor, slot: int, block: int, N: int) -> torch.Tensor:
    """Inverse of ``gather_slots``: ``y [B, nR * block, C]`` -> ``[B, N, C]`` (padding dropped)."""
    B, _, C = y.shape
    nR = src.numel() // slot
    y = y.view(B, nR, block, C)[:, :, :slot].reshape(B, nR * slot, C)
    keep = src >= 0
    out = y.new_zeros(B, N, C)
    out[:, src[keep]] = y[:, keep]
    return out


def routed_pattern(sel_idx: torch.Tensor, block: int, bank: torch.Tensor, key_tile: torch.Tensor,
                   diag_tile: Optional[int] = None, counts: Optional[torch.Tensor] = None) -> BlockPattern:
    """A BlockPattern over ``n = key_tile.numel()`` blocks of ``block`` tokens where query block
    ``i`` reads the key blocks ``sel_idx [B, H, n, k]`` (distinct, any order; the first ``counts``
    valid), each as a partial block through the element tile ``bank[key_tile[j]]`` (e.g. masking
    a region's padding slots), and block ``i`` itself (when selected) through ``bank[diag_tile]``
    when given. Built without any ``[n, n]`` mask (vectorized, no host sync beyond the list width)."""
    B, H, nq, kk = sel_idx.shape
    dev = sel_idx.device
    n = key_tile.numel()
    valid = torch.ones(B, H, nq, kk, dtype=torch.bool, device=dev) if counts is None else \
        torch.arange(kk, device=dev) < counts[..., None]
    key = torch.where(valid, sel_idx.long(), torch.full_like(sel_idx, n, dtype=torch.long))
    key = key.sort(-1).values
    valid = key < n
    kc = key.clamp(max=n - 1)
    ids = key_tile.to(dev)[kc]
    if diag_tile is not None:
        ids = torch.where(kc == torch.arange(nq, device=dev)[:, None], torch.full_like(ids, diag_tile), ids)
    ids = torch.where(valid, ids, torch.full_like(ids, -1)).to(torch.int32)
    cnt = valid.sum(-1, dtype=torch.int32)
    empty = torch.zeros(B, H, nq, dtype=torch.int32, device=dev)
    return BlockPattern(cnt.contiguous(), torch.where(valid, kc, 0).to(torch.int32).contiguous(), empty,
                        torch.zeros(B, H, nq, 1, dtype=torch.int32, device=dev), block, block, n * block, n * block,
                        False, ids.contiguous(), bank.to(dev).contiguous())


def slot_tiles(src: torch.Tensor, slot: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element tiles masking padding keys of region slots: ``src`` from ``region_order`` (``slot``
    tokens per region, padded to ``block``) -> (bank bool ``[U, block, block]``, id per region
    ``[nR]``) where tile ``[i, j]`` is True when key slot ``j`` of the region is a real token."""
    nR = src.numel() // slot
    real = torch.zeros(nR, block, dtype=torch.bool, device=src.device)
    real[:, :slot] = src.view(nR, slot) >= 0
    uniq, inv = torch.unique(real, dim=0, return_inverse=True)
    return uniq[:, None, :].expand(-1, block, -1).contiguous(), inv


def mask_pattern(mask: torch.Tensor, block: int = 64) -> BlockPattern:
    """A BlockPattern computing exactly the bool element mask ``[B, H, Tq, Tk]`` (per-instance,
    unstructured masks such as top-k connectivity): every non-empty tile is a partial block with
    its own bank entry (no deduplication: the bank is the mask's non-empty tiles, built without
    hashing, memory about that of the mask)."""
    B, H, Tq, Tk = mask.shape
    nq, nk = -(-Tq // block), -(-Tk // block)
    m = F.pad(mask, (0, nk * block - Tk, 0, nq * block - Tq))
    tiles = m.view(B, H, nq, block, nk, block).permute(0, 1, 2, 4, 3, 5)
    anyb = tiles.any(-1).any(-1)
    cnt = anyb.sum(-1, dtype=torch.int32)
    maxc = max(int(cnt.max()) if cnt.numel() else 0, 1)
    order = torch.sort((~anyb).to(torch.int8), dim=-1, stable=True).indices[..., :maxc]
    ids_all = (anyb.flatten().cumsum(0) - 1).view(B, H, nq, nk)
    valid = torch.arange(maxc, device=mask.device) < cnt[..., None]
    ids = torch.where(valid, ids_all.gather(-1, order), -1).to(torch.int32)
    bank = tiles[anyb]
    if bank.shape[0] == 0:
        bank = torch.zeros(1, block, block, dtype=torch.bool, device=mask.device)
    idx = torch.where(valid, order, 0).to(torch.int32)
    zeros = torch.zeros(B, H, nq, dtype=torch.int32, device=mask.device)
    return BlockPattern(cnt.contiguous(), idx.contiguous(), zeros, zeros[..., None].contiguous(), block, block, Tq, Tk,
                        False, ids.contiguous(), bank.contiguous())


def dense_masked_attention(q, k, v, mask: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Reference: softmax attention of ``q [B, H, Tq, d]`` on ``k, v`` under a bool element mask
    broadcastable to ``[B, H, Tq, Tk]``; rows without keys give zeros (used by the tests and by
    nothing on the training path)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    return (p @ v) / torch.where(den == 0, torch.ones_like(den), den)


__all__ = ["check_int", "check_float", "check_bool", "check_dim_heads", "check_input", "next_pow2", "QKVOut",
           "same_dtype", "region_order", "gather_slots", "scatter_slots", "routed_pattern", "slot_tiles", "mask_pattern",
           "dense_masked_attention", "P"]
