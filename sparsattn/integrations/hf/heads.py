"""hf.heads: the method(s) chosen for one layer and phase, and per-head composition of their patterns.

``_Choice`` holds one method, or one method per query head; per-head patterns are built by each
method and stacked (head h takes its blocks or tokens from the pattern of its method).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import patterns as _patterns
from ...methods.base import Method
from ...patterns import BlockPattern, TokenPattern, merge_heads


def _mname(m) -> str:
    return getattr(m, "name", "") or type(m).__name__


class _Choice:
    """The method(s) of one layer and phase: one method, or one method per query head."""

    def __init__(self, methods: list[Method], head_src: Optional[list[int]]):
        self.methods = methods
        self.head_src = head_src  # None = methods[0] for every head
        self._src_t: dict = {}

    def src(self, device) -> torch.Tensor:
        if device not in self._src_t:
            self._src_t[device] = torch.tensor(self.head_src, dtype=torch.long, device=device)
        return self._src_t[device]

    @property
    def dense_only(self) -> bool:
        """Only the registered "dense" method: the kernel's default causal pattern is used directly."""
        from ...methods.dense import Dense

        return all(type(m) is Dense for m in self.methods)

    @property
    def computes_output(self) -> bool:
        """One method for every head that computes attention itself (``Method.attend``)."""
        return self.head_src is None and self.methods[0].computes_output

    @property
    def needs_pre_rope(self) -> bool:
        return any(getattr(m, "needs_pre_rope", False) for m in self.methods)

    def describe(self) -> str:
        if self.head_src is None:
            return _mname(self.methods[0])
        return "heads[" + ",".join(_mname(self.methods[i]) for i in self.head_src) + "]"

    def select_block(self, q, k, ctx) -> Optional[BlockPattern]:
        pats = []
        for m in self.methods:
            if m.phase == "decode":
                pats.append(None)  # dense (causal) for this method's heads at prefill
                continue
            p = _static_select(m, q, k, ctx)
            if not isinstance(p, BlockPattern):
                raise ValueError(f"method {_mname(m)!r}: select() returned {type(p).__name__} at prefill; "
                                 "expected a sparsattn.patterns.BlockPattern")
            if not p.causal:
                raise ValueError(f"method {_mname(m)!r}: returned a non-causal pattern for a causal decoder; "
                                 "build the pattern with causal=True")
            pats.append(p)
        if self.head_src is None:
            return pats[0]
        ref = next((p for p in pats if p is not None), None)
        if ref is None:
            return None
        pats = [p if p is not None else _patterns.causal(ref.q_len, ref.kv_len, block_q=ref.block_q,
                                                          block_k=ref.block_k, device=q.device) for p in pats]
        return _stack_block_heads(pats, [self.methods[i] for i in range(len(self.methods))], self.src(q.device),
                                  q.shape[0], q.shape[1])

    def select_token(self, q, k, ctx) -> TokenPattern:
        pats = []
        for m in self.methods:
            if m.phase != "decode":
                pats.append(None)  # every cached token for this method's heads
                continue
            p = m.select(q, k, ctx)
            if not isinstance(p, TokenPattern):
                raise ValueError(f"method {_mname(m)!r}: select() returned {type(p).__name__} at decode; "
                                 "expected a sparsattn.patterns.TokenPattern")
            pats.append(p)
        if self.head_src is None:
            return pats[0]
        Tk = k.shape[2]
        ps = next((p.page_size for p in pats if p is not None), 1)
        full = torch.ones(1, 1, -(-Tk // ps), dtype=torch.bool, device=q.device)
        pats = [p if p is not None else TokenPattern.from_mask(full, page_size=ps, kv_len=Tk) for p in pats]
        return _stack_token_heads(pats, self.methods, self.src(q.device), q.shape[0], q.shape[1])


def _static_select(m: Method, q, k, ctx):
    """``m.select(q, k, ctx)``, reusing the pattern of an earlier layer when the method declares that it
    depends only on its ``static_pattern_key`` and the lengths (A-shape, S2, MoA per layer...): built
    once per forward instead of once per layer (and the kernels' derived data, e.g. the Flex
    BlockMask, with it). Not with per-sequence lengths; kept in the forward's ``ctx.state``."""
    key = m.static_pattern_key(ctx.layer) if hasattr(m, "static_pattern_key") else None
    if key is None or ctx.state is None or ctx.q_lens is not None or ctx.kv_lens is not None:
        return m.select(q, k, ctx)
    memo = ctx.state.setdefault("_sparsattn_static_patterns", {})
    full = (id(m), key, tuple(q.shape), tuple(k.shape), str(q.device), ctx.q_offset, ctx.sliding_window)
    if full not in memo:
        memo[full] = m.select(q, k, ctx)
    return memo[full]


def _to_bh(t: torch.Tensor, B: int, H: int, what: str) -> torch.Tensor:
    """Broadcast dims 0 (batch) and 1 (heads: 1, a divisor of H (GQA groups) or H) to (B, H)."""
    Hp = t.shape[1]
    if Hp != H:
        if Hp == 1:
            t = t.expand(t.shape[0], H, *t.shape[2:])
        elif H % Hp == 0:
            t = t.repeat_interleave(H // Hp, dim=1)
        else:
            raise ValueError(f"{what}: expected 1, a divisor of {H} or {H} heads, got {Hp}")
    if t.shape[0] != B:
        if t.shape[0] != 1:
            raise ValueError(f"{what}: expected batch 1 or {B}, got {t.shape[0]}")
        t = t.expand(B, *t.shape[1:])
    return t


def _pad_last(t: torch.Tensor, n: int, value=0) -> torch.Tensor:
    return F.pad(t, (0, n - t.shape[-1]), value=value) if t.shape[-1] < n else t


def _pick_heads(stacked: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """stacked [M, B, H, ...] -> [B, H, ...] taking method src[h] for head h."""
    h = torch.arange(src.numel(), device=src.device)
    return stacked[src, :, h].transpose(0, 1).contiguous()


def _stack_token_heads(pats: list[TokenPattern], methods, src, B, H) -> TokenPattern:
    ps = {p.page_size for p in pats}
    if len(ps) != 1:
        raise ValueError("heads: the methods produce token patterns of different page sizes "
                         + ", ".join(f"{_mname(m)}={p.page_size}" for m, p in zip(methods, pats)))
    w = max(p.indices.shape[-1] for p in pats)
    idx = torch.stack([_pad_last(_to_bh(p.indices, B, H, f"{_mname(m)} pattern"), w) for m, p in zip(methods, pats)])
    cnt = torch.stack([_to_bh(p.counts[..., None], B, H, f"{_mname(m)} pattern")[..., 0] for m, p in zip(methods, pats)])
    return TokenPattern(_pick_heads(idx, src), _pick_heads(cnt, src), pats[0].kv_len, pats[0].page_size)


def _stack_block_heads(pats: list[BlockPattern], methods, src, B, H) -> BlockPattern:
    """Compose per-head patterns: head h takes its blocks from ``pats[src[h]]``."""
    p0 = pats[0]
    for m, p in zip(methods, pats):
        if (p.block_q, p.block_k) != (p0.block_q, p0.block_k):
            raise ValueError("heads: the methods produce patterns of different block sizes ("
                             + ", ".join(f"{_mname(mm)}: {pp.block_q}x{pp.block_k}" for mm, pp in zip(methods, pats))
                             + "); give them the same block size")
        if (p.q_len, p.kv_len, p.causal) != (p0.q_len, p0.kv_len, p0.causal):
            raise ValueError(f"heads: method {_mname(m)!r} returned q_len/kv_len/causal "
                             f"{(p.q_len, p.kv_len, p.causal)}, expected {(p0.q_len, p0.kv_len, p0.causal)}")
    owner = src.tolist()  # head h takes head h (its GQA group's, or the only one) of pats[owner[h]]
    parts = []
    for j, p in enumerate(pats):
        if H % p.heads:
            raise ValueError(f"{_mname(methods[j])} pattern: expected 1, a divisor of {H} or {H} heads, got {p.heads}")
        hs = [h for h in range(H) if owner[h] == j]
        parts.append((hs, p, [h // (H // p.heads) for h in hs]))
    return merge_heads(parts, H)  # the one per-head merging rule (sparsattn.patterns.merge_heads)
