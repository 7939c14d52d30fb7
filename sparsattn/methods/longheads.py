"""longheads: LongHeads' per-head chunk selection (arXiv 2402.10685), as a block pattern."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import patterns
from ..kernels import estimate
from ._common import check_inputs, check_int, check_pow2, clamp_budget
from .base import DensityKnob, Method, PresetContext, SelectContext, register


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def mean_chunk_keys(k: torch.Tensor, window_size: int) -> torch.Tensor:
    """Mean key of every chunk of ``window_size`` tokens: float32 ``[B, H, ceil(T / window_size), D]``
    from ``k [B, H, T, D]`` (a last, partial chunk is the mean of the tokens it holds). LongHeads'
    ``chunk_key="mean"`` representative, shared with the decode variant (``longheads_decode``)."""
    B, H, T, D = k.shape
    w = int(window_size)
    nc = _cdiv(T, w)
    pad = nc * w - T
    kc = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, H, nc, w, D)
    n = (torch.arange(nc * w, device=k.device) < T).view(nc, w).sum(-1).clamp(min=1).float()
    return kc.sum(3) / n[:, None]


@register("longheads")
@dataclass
class LongHeads(Method):
    """LongHeads: every head attends, per query block, to at most ``atten_length`` tokens made of
    whole chunks of ``window_size`` tokens: the first chunk, the local chunks (the query's chunk
    and the one before it) and the chunks whose representative key best matches the queries
    (LongHeads, arXiv 2402.10685).

    Chunk representation (``chunk_key="attention"``, as the official code): full attention inside
    each chunk, chunk value = mean of the chunk's attention outputs, chunk key = attention-weighted
    mean of the chunk's keys with the chunk value as the query. This needs the values: pass
    ``ctx.v`` (``[B, Hkv, T, D]``) and full-prefix queries (``Tq == Tk``).
    ``chunk_key="mean"`` uses the mean key of the chunk instead (no values needed). If
    ``ctx.q_pre_rope`` / ``ctx.k_pre_rope`` are given they are used for scoring, as the
    paper scores with pre-RoPE queries.

    Differences from the paper, by design of a mask: (1) selection is per query block (the block's
    mean query), not per query token; (2) LongHeads re-assigns positions inside the selected window
    (chunks concatenated and re-rotated with positions 0..atten_length) so that a model never sees
    distances beyond its training length. A mask cannot express that: it needs the integration to
    re-apply RoPE to the gathered keys per query block, and is left out here. The mask alone is the
    chunk selection on the model's original positions. Pattern: block (block_size, window_size),
    heads = query heads.

    Defaults (``LuLuLuyi/LongHeads``, METHODS.md B7 [code]): window_size=256, atten_length=4096
    (16 chunks). ``begin_selective_length`` (4096) is implied: below atten_length tokens every chunk
    is kept (dense).
    """

    paper = "LongHeads: Multi-Head Attention is Secretly a Long Context Processor (arXiv 2402.10685)"
    phase = "prefill"
    window_size: int = 256
    atten_length: int = 4096
    block_size: int = 64
    chunk_key: str = "attention"
    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> DensityKnob:
        """Preset: chunk w = power of two <= b / 4 in [32, 256] (b = target x (T + 1) / 2), block
        min(64, w); knob atten_length / w."""
        b = target * (T + 1) / 2
        w = min(256, max(32, 1 << max(0, int(math.floor(math.log2(max(1.0, b / 4)))))))
        blk = min(64, w)
        return DensityKnob(cls.name, "atten_length/window", 3, max(3, -(-T // w)), True, True, max(3.0, b / w),
                           lambda x: dict(window_size=w, atten_length=int(x) * w, block_size=blk, chunk_key="attention"),
                           lambda x: f"w{w}/len{int(x) * w}")


    def __post_init__(self):
        check_pow2("window_size", self.window_size)
        check_pow2("block_size", self.block_size)
        check_int("atten_length", self.atten_length, 3 * self.window_size)
        if self.atten_length % self.window_size:
            raise ValueError(f"atten_length: expected a multiple of window_size={self.window_size}, got {self.atten_length}")
        if self.block_size > self.window_size:
            raise ValueError(f"block_size: expected <= window_size={self.window_size}, got {self.block_size}")
        if self.chunk_key not in ("attention", "mean"):
            raise ValueError(f"chunk_key: expected 'attention' or 'mean', got {self.chunk_key!r}")

    @classmethod
    def small_config(cls) -> dict:
        return {"window_size": 32, "atten_length": 128, "block_size": 32}

    @classmethod
    def full_config(cls, q_len: int) -> dict:
        return {"window_size": 32, "atten_length": max(96, _cdiv(q_len, 32) * 32), "block_size": 32}

    def chunk_keys(self, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], scale: Optional[float]) -> torch.Tensor:
        """Representative key per chunk and query head: float32 ``[B, Hq, n_chunks, D]``."""
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        w = self.window_size
        if self.chunk_key == "mean":
            return mean_chunk_keys(k, w).repeat_interleave(G, 1)
        nc = _cdiv(k.shape[2], w)
        pad = nc * w - k.shape[2]
        kc = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, Hkv, nc, w, D)
        valid = (torch.arange(nc * w, device=k.device) < k.shape[2]).view(nc, w)
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        vc = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(B, Hkv, nc, w, v.shape[-1])
        qc = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).view(B, Hkv, G, nc, w, D)
        ck = torch.empty(B, Hkv, G, nc, D, dtype=torch.float32, device=q.device)
        step = max(1, (1 << 25) // max(1, B * G * w * w))  # chunks per slice: bounded w x w score memory
        for h in range(Hkv):
            for c0 in range(0, nc, step):
                c1 = min(nc, c0 + step)
                kk, vv, ok = kc[:, h, c0:c1], vc[:, h, c0:c1], valid[c0:c1]
                s = torch.einsum("bgcid,bcjd->bgcij", qc[:, h, :, c0:c1], kk) * scale
                s = s.masked_fill(~ok[None, None, :, None, :], float("-inf"))
                o = torch.einsum("bgcij,bcjd->bgcid", torch.softmax(s, -1), vv)
                cv = (o * ok[None, None, :, :, None]).sum(3) / ok.sum(-1).clamp(min=1)[:, None]  # chunk values
                s2 = torch.einsum("bgcd,bcjd->bgcj", cv, kk) * scale
                s2 = s2.masked_fill(~ok[None, None], float("-inf"))
                ck[:, h, :, c0:c1] = torch.einsum("bgcj,bcjd->bgcd", torch.softmax(s2, -1), kk)
        return ck.reshape(B, Hq, nc, D)

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        check_inputs("longheads", q, k, ctx)
        B, Hq, Tq, D = q.shape
        Tk = k.shape[2]
        qs = q if ctx.q_pre_rope is None else ctx.q_pre_rope
        ks = k if ctx.k_pre_rope is None else ctx.k_pre_rope
        v = None
        if self.chunk_key == "attention":
            v = ctx.v
            if not isinstance(v, torch.Tensor) or v.shape[:3] != k.shape[:3] or v.shape[3] != D:
                raise ValueError("ctx.v (extras['v']): longheads with chunk_key='attention' needs the values "
                                 f"[B, Hkv, Tk, {D}] to build chunk keys (or use chunk_key='mean'), got "
                                 f"{getattr(v, 'shape', None)}")
            if Tq != Tk:
                raise ValueError(f"q tokens: chunk_key='attention' needs the queries of every chunk (Tq == Tk={Tk}), "
                                 f"got {Tq}; use chunk_key='mean' for chunked prefill")
        w, bq = self.window_size, self.block_size
        nc, nq = _cdiv(Tk, w), _cdiv(Tq, bq)
        n_sel = clamp_budget("longheads", "atten_length // window_size", self.atten_length // w, nc)
        ck = self.chunk_keys(qs, ks, v, ctx.scale)  # [B,Hq,nc,D]
        qm = estimate.pool_blocks(qs, bq, "mean")  # [B,Hq,nq,D]
        sc = torch.einsum("bhnd,bhcd->bhnc", qm, ck)
        dev = q.device
        off = Tk - Tq
        r0 = torch.arange(nq, device=dev) * bq
        r1 = torch.clamp(r0 + bq, max=Tq) - 1
        c = torch.arange(nc, device=dev)
        allowed = c[None, :] * w <= (r1 + off)[:, None]
        forced = (c[None, :] == 0) | ((c[None, :] >= (r0 + off)[:, None] // w - 1) & (c[None, :] <= (r1 + off)[:, None] // w))
        forced = forced & allowed
        sc = sc.masked_fill(forced, float("inf")).masked_fill(~allowed, float("-inf"))
        per_row = torch.minimum(allowed.sum(-1), torch.clamp(forced.sum(-1), min=n_sel))  # [nq]
        idx, ok = estimate.topk_indices(sc, int(per_row.max()))
        ok = ok & (torch.arange(idx.shape[-1], device=dev) < per_row[:, None])
        return patterns.from_topk_blocks(idx, q_len=Tq, kv_len=Tk, block_size=(bq, w), counts=ok.sum(-1).to(torch.int32))
