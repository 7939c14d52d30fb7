"""KVCache: per-layer K/V storage for decoding with per-(batch, head) lengths, eviction and offload.

Layouts:

* ``"contiguous"``: per layer ``k, v [B, Hkv, capacity, D]``. Each (batch, kv head) row holds
  ``lengths[b, h]`` *slots*; slot ``s`` stores the token at original position ``positions[b, h, s]``
  (``-1`` for a merged/compensation slot standing for ``exp(log_weight[b, h, s])`` tokens). Policies
  may evict different tokens per (batch, head); eviction compacts the row (order kept) and
  ``shrink()`` gives the memory back.
* ``"paged"``: per layer a page pool ``[n_pages, Hkv, page_size, D]`` and a block table
  ``[B, max_pages]`` (vLLM style); every head of a sequence has the same tokens. Append, gather,
  attend and offload work; per-head eviction needs the contiguous layout (ValueError).

Head groups (contiguous layout): after per-head eviction the rows of different KV heads can have very
different lengths (RazorAttention's retrieval heads keep everything, MoA's spans differ per head).
``shrink()`` then partitions the layer's KV heads into *groups* of similar length, each stored as its
own ``[B, H_g, cap_g, D]`` tensor (``cap_g`` = the longest row of the group), so storage follows the
per-head lengths. Rule (deterministic): heads are ordered by their longest row (over the batch),
longest first, ties by head id; a head joins the current group unless the group's padding (slots
allocated beyond each head's longest row) would then exceed ``group_waste`` (default 0.1) of the
group's storage, in which case it starts a new group. One group = the plain single-tensor layout
(``group_waste=1`` never splits). ``attend`` runs the decode kernel once per group on that group's
query heads (each query head only reads its own KV head, so this is exact); ``gather``,
``prefetch``, ``append``, ``evict``, ``write_slot``, ``offload`` and ``fetch`` work per group;
``get``, ``positions`` and ``log_weights`` return padded ``[B, Hkv, T, ...]`` tensors that are
*materialised* (new tensors, not views of the storage) on a grouped layer, ``T`` = the largest group
capacity. Appends after grouping grow each group on its own.

Offload: ``offload(layer)`` moves a layer's K/V to host memory (pinned when CUDA is available),
``prefetch(layer, pattern)`` copies only the selected rows back to the device asynchronously (a
side CUDA stream when on CUDA) and ``fetch(layer)`` brings the whole layer back; ``append`` on an
offloaded layer writes the new rows to host memory. Round trips are exact (plain copies).

``nbytes()`` reports the bytes actually kept (K/V storage, quantised codes and metadata).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..kernels.sparse_decode import sparse_decode_attention
from ..kernels.sparse_decode.reference import paged_to_contiguous
from ..patterns import TokenPattern
from .groups import head_groups

Tensor = torch.Tensor


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


@dataclass
class _Layer:
    k: Optional[Tensor] = None
    v: Optional[Tensor] = None
    lengths: Optional[Tensor] = None  # [B, H] (contiguous) or [B] (paged), int64
    positions: Optional[Tensor] = None  # [B, H, cap] int64 (contiguous)
    log_weight: Optional[Tensor] = None  # [B, H, cap] float32 or None
    seen: Optional[Tensor] = None  # [B] int64: tokens appended so far (next absolute position)
    block_table: Optional[Tensor] = None  # [B, max_pages] int32 (paged)
    n_used_pages: int = 0
    on_host: bool = False
    quant: Optional[object] = None  # a MixedPrecisionKV (ZipVL) replacing k/v
    groups: Optional[list] = None  # head groups (contiguous layout) replacing k/v/positions/log_weight
    head_group: Optional[Tensor] = None  # [H] group id of each kv head (grouped layers)
    head_local: Optional[Tensor] = None  # [H] index of each kv head inside its group


@dataclass
class _Group:
    """One head group of a grouped contiguous layer: kv heads ``heads`` (ascending) stored together."""

    heads: Tensor  # [H_g] int64
    k: Tensor  # [B, H_g, cap_g, D]
    v: Tensor
    positions: Tensor  # [B, H_g, cap_g] int64
    log_weight: Optional[Tensor] = None  # [B, H_g, cap_g] float32 or None


@dataclass
class Prefetched:
    """Prefetched: selected rows copied to the device; call ``wait()`` before use (CUDA streams).

    ``k, v``: ``[B, Hkv, n, D]``; ``pattern``: a TokenPattern over those ``n`` rows (page_size 1)
    that selects exactly the rows that were requested and valid; ``log_weight`` aligned with it.
    """

    k: Tensor
    v: Tensor
    pattern: TokenPattern
    log_weight: Optional[Tensor] = None
    event: Optional[object] = field(default=None, repr=False)

    def wait(self) -> "Prefetched":
        if self.event is not None:
            cur = torch.cuda.current_stream(self.k.device)
            cur.wait_event(self.event)
            for t in (self.k, self.v):  # allocated on the side stream, used on this one
                t.record_stream(cur)
            self.event = None
        return self


class KVCache:
    """KVCache: K/V cache of ``n_layers`` layers, batch ``B`` with per-sequence (and per-head) lengths.

    Args:
        n_layers, batch, kv_heads, head_dim: sizes.
        dtype, device: storage dtype and device.
        layout: ``"contiguous"`` (default) or ``"paged"``.
        page_size: tokens per page for the paged layout (default 16).
        capacity: initial token capacity per row (grows by doubling).
        group_waste: contiguous layout: the largest fraction of a head group's storage that may be
            padding when ``shrink()`` groups heads by length (default 0.1; 1 = never split, the
            single-tensor layout). See the module docstring.
    """

    def __init__(self, n_layers: int, batch: int, kv_heads: int, head_dim: int, *, dtype=torch.float16,
                 device="cpu", layout: str = "contiguous", page_size: int = 16, capacity: int = 0,
                 group_waste: float = 0.1):
        for name, val in (("n_layers", n_layers), ("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if not isinstance(val, int) or val < 1:
                raise _err(name, "an int >= 1", val)
        if layout not in ("contiguous", "paged"):
            raise _err("layout", "'contiguous' or 'paged'", repr(layout))
        if not isinstance(page_size, int) or page_size < 1:
            raise _err("page_size", "an int >= 1", page_size)
        if not isinstance(capacity, int) or capacity < 0:
            raise _err("capacity", "an int >= 0", capacity)
        if isinstance(group_waste, bool) or not isinstance(group_waste, (int, float)) or not 0 <= group_waste <= 1:
            raise _err("group_waste", "a number in [0, 1]", group_waste)
        self.group_waste = float(group_waste)
        self.n_layers, self.batch, self.kv_heads, self.head_dim = n_layers, batch, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.layout, self.page_size, self._cap0 = layout, page_size, capacity
        self.layers = [_Layer() for _ in range(n_layers)]
        self._stream = None

    # ------------------------------------------------------------------ helpers
    def _layer(self, layer: int) -> _Layer:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise _err("layer", f"an int in [0, {self.n_layers})", layer)
        L = self.layers[layer]
        if L.lengths is None:
            B, H = self.batch, self.kv_heads
            dev = self.device
            L.seen = torch.zeros(B, dtype=torch.long, device=dev)
            if self.layout == "contiguous":
                cap = self._cap0
                L.k = torch.zeros(B, H, cap, self.head_dim, dtype=self.dtype, device=dev)
                L.v = torch.zeros_like(L.k)
                L.lengths = torch.zeros(B, H, dtype=torch.long, device=dev)
                L.positions = torch.full((B, H, cap), -1, dtype=torch.long, device=dev)
            else:
                P = self.page_size
                n = max(1, -(-self._cap0 // P)) * B
                L.k = torch.zeros(n, H, P, self.head_dim, dtype=self.dtype, device=dev)
                L.v = torch.zeros_like(L.k)
                L.lengths = torch.zeros(B, dtype=torch.long, device=dev)
                L.block_table = torch.zeros(B, 0, dtype=torch.int32, device=dev)
        return L

    def _check_resident(self, L: _Layer, name: str):
        if L.on_host:
            raise ValueError(f"layer: is offloaded to host memory; call fetch() or prefetch() before {name}")

    @staticmethod
    def _stores(L: _Layer):
        """``[(store, heads)]``: the layer itself (heads None = all) or each head group."""
        return [(L, None)] if L.groups is None else [(g, g.heads) for g in L.groups]

    @staticmethod
    def _cap(L: _Layer) -> int:
        """Slot count ``T`` of the layer's padded view (the largest group capacity when grouped)."""
        if L.groups is None:
            return L.k.shape[2]
        return max(g.k.shape[2] for g in L.groups)

    def _materialise(self, L: _Layer, name: str, fill):
        """Padded ``[B, Hkv, T, ...]`` copy of a per-group attribute of a grouped layer (None if no group has it)."""
        parts = [(g.heads, getattr(g, name)) for g in L.groups]
        ref = next((x for _, x in parts if x is not None), None)
        if ref is None:
            return None
        out = torch.full((self.batch, self.kv_heads, self._cap(L), *ref.shape[3:]), fill, dtype=ref.dtype,
                         device=ref.device)
        for hs, x in parts:
            if x is not None:
                out[:, hs.to(out.device), : x.shape[2]] = x
        return out

    def seq_lens(self, layer: int) -> Tensor:
        """Tokens appended so far per sequence ``[B]`` (the next absolute position)."""
        return self._layer(layer).seen.clone()

    def lengths(self, layer: int) -> Tensor:
        """Slots kept per (batch, head) ``[B, Hkv]`` (after eviction/compression)."""
        L = self._layer(layer)
        if self.layout == "paged":
            return L.lengths[:, None].expand(-1, self.kv_heads).clone()
        return L.lengths.clone()

    def kv_lens(self, layer: int) -> Tensor:
        """Per-sequence valid length ``[B]`` int32: the longest row of the sequence."""
        L = self._layer(layer)
        n = L.lengths if self.layout == "paged" else L.lengths.amax(1)
        return n.to(torch.int32)

    # ------------------------------------------------------------------ append
    def append(self, layer: int, k: Tensor, v: Tensor, lens=None) -> None:
        """Append ``k, v [B, Hkv, t, D]``; ``lens [B]`` = valid new tokens per sequence (default t;
        right-padded beyond). New tokens go after each row's current slots. On an offloaded layer
        the new rows are written to host memory (the layer stays offloaded)."""
        L = self._layer(layer)
        if L.quant is not None:
            raise ValueError("layer: holds a quantised (ZipVL) cache; appends go through the policy")
        B, H, D = self.batch, self.kv_heads, self.head_dim
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] != B or x.shape[1] != H or x.shape[3] != D:
                raise _err(name, f"a tensor [{B}, {H}, t, {D}]", getattr(x, "shape", type(x).__name__))
        if k.shape != v.shape:
            raise _err("v", f"shape {tuple(k.shape)} (as k)", tuple(v.shape))
        t = k.shape[2]
        if lens is None:
            lens = torch.full((B,), t, dtype=torch.long, device=self.device)
        else:
            lens = torch.as_tensor(lens, device=self.device).long()
            if lens.shape != (B,) or int(lens.min()) < 0 or int(lens.max()) > t:
                raise _err("lens", f"a [B={B}] tensor of values in [0, {t}]", lens.tolist())
        k = k.to(device=self.device, dtype=self.dtype)
        v = v.to(device=self.device, dtype=self.dtype)
        j = torch.arange(t, device=self.device)
        ok = j[None, :] < lens[:, None]  # [B, t]
        if self.layout == "contiguous":
            for S, hs in self._stores(L):
                ln = L.lengths if hs is None else L.lengths[:, hs]
                ks, vs = (k, v) if hs is None else (k[:, hs], v[:, hs])
                Hs = ln.shape[1]
                need = int((ln + lens[:, None]).max()) if B and Hs else 0
                self._grow(S, need, L.on_host)
                slots = ln[:, :, None] + j  # [B, Hs, t]
                m = ok[:, None, :].expand(B, Hs, t)
                bi, hi, ti = m.nonzero(as_tuple=True)
                si = slots[bi, hi, ti]
                hd = S.k.device  # host memory when offloaded
                S.k[bi.to(hd), hi.to(hd), si.to(hd)] = ks[bi, hi, ti].to(hd)
                S.v[bi.to(hd), hi.to(hd), si.to(hd)] = vs[bi, hi, ti].to(hd)
                S.positions[bi, hi, si] = L.seen[bi] + ti
                if S.log_weight is not None:
                    S.log_weight[bi, hi, si] = 0.0
            L.lengths += lens[:, None]
        else:
            P = self.page_size
            need_pages = -(-(L.lengths + lens) // P)  # [B]
            self._grow_pages(L, need_pages)
            bi, ti = ok.nonzero(as_tuple=True)
            tok = L.lengths[bi] + ti
            pg = L.block_table[bi, tok // P].long()
            hd = L.k.device  # host memory when offloaded
            L.k[pg.to(hd), :, (tok % P).to(hd)] = k[bi, :, ti].to(hd)
            L.v[pg.to(hd), :, (tok % P).to(hd)] = v[bi, :, ti].to(hd)
            L.lengths += lens
        L.seen += lens

    def _grow(self, L, need: int, on_host: bool) -> None:
        """Grow a store's (a layer's or a head group's) capacity to at least ``need`` slots (doubling)."""
        cap = L.k.shape[2]
        if need <= cap:
            return
        new = max(need, 2 * cap, 16)
        pad = new - cap
        L.k = torch.cat([L.k, L.k.new_zeros(*L.k.shape[:2], pad, L.k.shape[3])], 2)
        L.v = torch.cat([L.v, L.v.new_zeros(*L.v.shape[:2], pad, L.v.shape[3])], 2)
        L.positions = torch.cat([L.positions, L.positions.new_full((*L.positions.shape[:2], pad), -1)], 2)
        if L.log_weight is not None:
            L.log_weight = torch.cat([L.log_weight, L.log_weight.new_zeros(*L.log_weight.shape[:2], pad)], 2)
        self._repin(L, on_host)

    @staticmethod
    def _repin(L, on_host: bool) -> None:
        """Keep an offloaded store's grown K/V in pinned memory (CUDA only)."""
        if on_host and torch.cuda.is_available() and not L.k.is_pinned():
            L.k, L.v = L.k.pin_memory(), L.v.pin_memory()

    def _grow_pages(self, L: _Layer, need_pages: Tensor) -> None:
        B = self.batch
        have = L.block_table.shape[1]
        want = int(need_pages.max()) if B else 0
        if want > have:
            extra = torch.full((B, want - have), -1, dtype=torch.int32, device=self.device)
            L.block_table = torch.cat([L.block_table, extra], 1)
        # allocate pages for every (b, page) that is needed and unassigned
        bt = L.block_table
        cols = torch.arange(bt.shape[1], device=self.device)
        missing = (bt < 0) & (cols[None, :] < need_pages[:, None])
        n_new = int(missing.sum())
        if n_new:
            if L.n_used_pages + n_new > L.k.shape[0]:
                grow = max(L.n_used_pages + n_new, 2 * L.k.shape[0]) - L.k.shape[0]
                L.k = torch.cat([L.k, L.k.new_zeros(grow, *L.k.shape[1:])], 0)
                L.v = torch.cat([L.v, L.v.new_zeros(grow, *L.v.shape[1:])], 0)
                self._repin(L, L.on_host)
            ids = torch.arange(L.n_used_pages, L.n_used_pages + n_new, device=self.device, dtype=torch.int32)
            bt[missing] = ids
            L.n_used_pages += n_new
        # unallocated tail entries point at page 0 (never read: beyond kv_lens)
        L.block_table = bt

    # ------------------------------------------------------------------ read
    def get(self, layer: int):
        """``(k, v)`` as ``[B, Hkv, T, D]`` slot-major tensors (paged layouts are gathered; ZipVL
        layers are dequantised; grouped layers are materialised into new padded tensors). Slots
        beyond ``lengths`` hold zeros."""
        L = self._layer(layer)
        self._check_resident(L, "get")
        if L.quant is not None:
            return L.quant.dequantize()
        if L.groups is not None:
            return self._materialise(L, "k", 0), self._materialise(L, "v", 0)
        if self.layout == "paged":
            T = L.block_table.shape[1] * self.page_size
            bt = L.block_table.clamp_min(0)
            return paged_to_contiguous(L.k, bt, T), paged_to_contiguous(L.v, bt, T)
        return L.k, L.v

    def positions(self, layer: int) -> Tensor:
        """Original token position of every slot ``[B, Hkv, T]`` (-1: empty or merged slot; a new
        tensor on a grouped layer)."""
        L = self._layer(layer)
        if L.groups is not None:
            return self._materialise(L, "positions", -1)
        if self.layout == "paged":
            T = L.block_table.shape[1] * self.page_size
            p = torch.arange(T, device=self.device).expand(self.batch, self.kv_heads, T)
            return torch.where(p < L.lengths[:, None, None], p, torch.full_like(p, -1))
        return L.positions

    def log_weights(self, layer: int) -> Optional[Tensor]:
        """Per-slot log-weight ``[B, Hkv, T]`` (log of the tokens a slot stands for), or None (a new
        tensor on a grouped layer)."""
        L = self._layer(layer)
        if L.groups is not None:
            return self._materialise(L, "log_weight", 0.0)
        return L.log_weight

    def gather(self, layer: int, pattern: TokenPattern):
        """Selected slots ``(k, v) [B, Hkv, n, D]`` for a slot-indexed pattern (heads 1 or Hkv)."""
        L = self._layer(layer)
        if L.groups is not None:
            self._check_resident(L, "gather")
            tok, valid = _pattern_rows(pattern, self.kv_lens(layer), self.batch, self.kv_heads)
            return self._gather_groups(L, tok.to(self.device), valid.to(self.device))
        k, v = self.get(layer)
        tok, valid = _pattern_rows(pattern, self.kv_lens(layer), self.batch, self.kv_heads)
        t = torch.where(valid, tok, torch.zeros_like(tok))
        kk = torch.gather(k, 2, t[..., None].expand(-1, -1, -1, k.shape[-1]))
        vv = torch.gather(v, 2, t[..., None].expand(-1, -1, -1, v.shape[-1]))
        return kk * valid[..., None], vv * valid[..., None]

    def _gather_groups(self, L: _Layer, tok: Tensor, valid: Tensor, out=None):
        """Rows ``tok [B, Hkv, n]`` of a grouped layer, zeros where not ``valid`` or past a group's
        storage (as the zero padding of the single-tensor layout); written into ``out`` when given."""
        B, H, n = tok.shape
        dev = L.groups[0].k.device
        tok, valid = tok.to(dev), valid.to(dev)
        if out is None:
            out = tuple(torch.empty(B, H, n, self.head_dim, dtype=self.dtype, device=dev) for _ in range(2))
        for g in L.groups:
            hs = g.heads.to(dev)
            cap = g.k.shape[2]
            t = tok[:, hs]
            ok = valid[:, hs] & (t < cap)
            idx = torch.where(ok, t, torch.zeros_like(t))[..., None].expand(-1, -1, -1, self.head_dim)
            for src, dst in ((g.k, out[0]), (g.v, out[1])):
                rows = torch.gather(src, 2, idx) if cap else src.new_zeros(idx.shape)
                dst[:, hs] = rows.masked_fill(~ok[..., None], 0)
        return out

    def _attend_groups(self, L: _Layer, q: Tensor, pattern: Optional[TokenPattern], kw: dict):
        """Decode attention on a grouped layer: one kernel call per head group on its query heads."""
        B, H = self.batch, self.kv_heads
        if q.dim() == 4 and q.shape[2] == 1:
            q = q[:, :, 0]
        if not isinstance(q, Tensor) or q.dim() != 3 or q.shape[0] != B or q.shape[1] % H or q.shape[1] == 0:
            raise _err("q", f"a tensor [B={B}, Hq (a multiple of {H}), D]", getattr(q, "shape", type(q).__name__))
        Hq, G = q.shape[1], q.shape[1] // H
        dev = q.device
        kl = L.lengths.amax(1).to(torch.int32)
        T = self._cap(L)
        tok = valid = None
        if pattern is not None:
            from ..kernels.sparse_decode import _deep_check
            from ..kernels.sparse_decode.reference import selected_tokens

            if not isinstance(pattern, TokenPattern):
                raise _err("pattern", "a sparsattn.patterns.TokenPattern or None", type(pattern).__name__)
            if pattern.kv_len != T:
                raise _err("pattern.kv_len", f"{T} (the cache's slot count)", pattern.kv_len)
            if pattern.batch not in (1, B):
                raise _err("pattern batch", f"1 or {B}", pattern.batch)
            if pattern.heads not in (1, H, Hq):
                raise _err("pattern heads", f"1, {H} (kv heads) or {Hq} (query heads)", pattern.heads)
            if kw.get("validate", True):
                _deep_check(pattern, kl.to(pattern.device))
            tok, valid, _ = selected_tokens(pattern, kl.to(pattern.device), T, pattern.heads)
            tok, valid = tok.to(dev), valid.to(dev)
        out = torch.zeros(B, Hq, q.shape[2], dtype=q.dtype, device=dev)
        lse = torch.full((B, Hq), float("-inf"), dtype=torch.float32, device=dev)
        garange = torch.arange(G, device=dev)
        for g in L.groups:
            hs = g.heads.to(dev)
            qi = (hs[:, None] * G + garange).reshape(-1)
            ln = L.lengths[:, hs].to(dev)  # [B, H_g]
            cap = g.k.shape[2]
            if pattern is None and g.log_weight is None:  # every kept slot: dense over each row's length
                o, s = sparse_decode_attention(q[:, qi], g.k, g.v, None, kv_lens=ln.to(torch.int32),
                                               **dict(kw, return_lse=True))
                out[:, qi] = o
                lse[:, qi] = s
                continue
            if pattern is None:
                t = torch.arange(max(cap, 1), device=dev).expand(B, hs.numel(), -1)
                ok = t < ln[..., None]
            else:
                R = tok.shape[1]
                rows = hs if R == H else (qi if R == Hq else torch.zeros(hs.numel(), dtype=torch.long, device=dev))
                lim = ln if R != Hq else L.lengths[:, qi // G].to(dev)
                t, ok = tok[:, rows], valid[:, rows]
                ok = ok & (t < lim[..., None])  # a slot past its row's length holds nothing: skipped
                order = torch.sort((~ok).to(torch.int8), dim=-1, stable=True).indices  # selected first, in order
                t, ok = torch.gather(t, 2, order), torch.gather(ok, 2, order)
                n = max(int(ok.sum(-1).max()) if ok.numel() else 0, 1)
                t, ok = t[..., :n], ok[..., :n]
                if t.shape[-1] < n:  # empty selection
                    t = torch.zeros(*t.shape[:2], n, dtype=torch.long, device=dev)
                    ok = torch.zeros(t.shape, dtype=torch.bool, device=dev)
            t = torch.where(ok, t, torch.zeros_like(t))
            pat = TokenPattern(t.to(torch.int32).contiguous(), ok.sum(-1).to(torch.int32).contiguous(), cap)
            lw = None
            if g.log_weight is not None and cap:
                lw = torch.gather(g.log_weight.to(dev), 2, t.clamp_max(cap - 1))
            o, s = sparse_decode_attention(q[:, qi], g.k, g.v, pat, kv_lens=ln.amax(1).to(torch.int32),
                                           log_weight=lw, **dict(kw, return_lse=True))
            out[:, qi] = o
            lse[:, qi] = s
        return (out, lse) if kw.get("return_lse") else out

    def attend(self, layer: int, q: Tensor, pattern: Optional[TokenPattern] = None, *, scale=None,
               return_lse: bool = False, backend=None, validate: bool = True):
        """Decode attention of ``q [B, Hq, D]`` on this layer (optionally on a slot-indexed pattern);
        per-head lengths and compensation log-weights are honoured. On a grouped layer the kernel runs
        once per head group (exact); selected slots past a row's own length are skipped either way."""
        L = self._layer(layer)
        self._check_resident(L, "attend")
        kl = self.kv_lens(layer)
        kw = dict(scale=scale, return_lse=return_lse, backend=backend, validate=validate)
        if L.groups is not None:
            return self._attend_groups(L, q, pattern, kw)
        if self.layout == "paged" and L.quant is None:
            T = L.block_table.shape[1] * self.page_size
            if pattern is not None and pattern.kv_len != T:
                raise _err("pattern.kv_len", f"{T} (the cache's slot count)", pattern.kv_len)
            return sparse_decode_attention(q, L.k, L.v, pattern, kv_lens=kl, block_table=L.block_table.clamp_min(0),
                                           **kw)
        k, v = self.get(layer)
        T = k.shape[2]
        lens = L.lengths if L.quant is None else L.quant.lengths
        lw_all = L.log_weight
        uniform = bool((lens == lens[:, :1]).all())
        if pattern is None:
            if lw_all is None:  # every kept slot: dense over each row's own length, no index list
                return sparse_decode_attention(q, k, v, None, kv_lens=kl if uniform else lens.to(torch.int32), **kw)
            idx = torch.arange(max(T, 1), device=k.device, dtype=torch.int32).expand(self.batch, self.kv_heads, -1)
            pattern = TokenPattern(idx.contiguous(), lens.to(torch.int32), T)
        if pattern.kv_len != T:
            raise _err("pattern.kv_len", f"{T} (the cache's slot count)", pattern.kv_len)
        if not uniform:
            # per-head lengths in one tensor: selected slots past a head's own length hold nothing and
            # are skipped (as on the grouped path): checked against the sequence's longest row, then
            # the kernel bounds each KV head by its own length
            if kw.get("validate", True):
                from ..kernels.sparse_decode import _deep_check

                _deep_check(pattern, kl.to(pattern.device))
            kl = lens.to(torch.int32)
            kw = dict(kw, validate=False)
        lw = None
        if lw_all is not None:
            if pattern.page_size != 1:
                raise _err("pattern.page_size", "1 for a layer with compensation tokens", pattern.page_size)
            if pattern.heads != self.kv_heads or pattern.batch != self.batch:  # weights differ per (b, head)
                pattern = TokenPattern(pattern.indices.expand(self.batch, self.kv_heads, -1).contiguous(),
                                       pattern.counts.expand(self.batch, self.kv_heads).contiguous(), T)
            idx = pattern.indices.long()
            lw = torch.gather(lw_all, 2, idx.clamp_max(max(T - 1, 0)))
        return sparse_decode_attention(q, k, v, pattern, kv_lens=kl, log_weight=lw, **kw)

    # ------------------------------------------------------------------ eviction
    def evict(self, layer: int, keep: Tensor) -> None:
        """Keep only the slots where ``keep [B, Hkv, T]`` is True (per (batch, head)); rows are
        compacted in order. Slots beyond ``lengths`` are ignored."""
        L = self._layer(layer)
        self._check_resident(L, "evict")
        if self.layout != "contiguous":
            raise _err("layout", "'contiguous' for per-head eviction", self.layout)
        if L.quant is not None:
            raise ValueError("layer: holds a quantised (ZipVL) cache; it cannot evict slots")
        T = self._cap(L)
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (self.batch, self.kv_heads, T):
            raise _err("keep", f"a bool tensor [{self.batch}, {self.kv_heads}, {T}]", getattr(keep, "shape", None))
        keep = keep.to(self.device)
        for S, hs in self._stores(L):
            ln = L.lengths if hs is None else L.lengths[:, hs]
            kp = keep if hs is None else keep[:, hs, : S.k.shape[2]]
            n = self._compact(S, kp, ln)
            if hs is None:
                L.lengths = n
            else:
                L.lengths[:, hs] = n

    def _compact(self, S, keep: Tensor, lengths: Tensor) -> Tensor:
        """Keep ``keep`` slots of a store's rows (order kept, cleared after); returns the new lengths."""
        T = S.k.shape[2]
        live = torch.arange(T, device=self.device) < lengths[..., None]
        keep = keep & live
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept slots first
        g = order[..., None].expand(-1, -1, -1, S.k.shape[-1])
        S.k = torch.gather(S.k, 2, g)
        S.v = torch.gather(S.v, 2, g)
        S.positions = torch.gather(S.positions, 2, order)
        if S.log_weight is not None:
            S.log_weight = torch.gather(S.log_weight, 2, order)
        n = keep.sum(-1)
        dead = torch.arange(T, device=self.device) >= n[..., None]
        S.positions[dead] = -1
        S.k[dead] = 0
        S.v[dead] = 0
        if S.log_weight is not None:
            S.log_weight[dead] = 0
        return n

    def write_slot(self, layer: int, b: Tensor, h: Tensor, k: Tensor, v: Tensor, log_weight: Tensor) -> None:
        """Append one merged slot per listed (b, h) with its key/value and log-weight (position -1)."""
        L = self._layer(layer)
        self._check_resident(L, "write_slot")
        if self.layout != "contiguous":
            raise _err("layout", "'contiguous' for merged slots", self.layout)
        if L.quant is not None:
            raise ValueError("layer: holds a quantised (ZipVL) cache; it cannot take merged slots")
        if b.numel() == 0:
            return
        b, h = b.to(self.device).long(), h.to(self.device).long()
        for gi, (S, hs) in enumerate(self._stores(L)):
            if hs is None:
                m, loc = slice(None), h
            else:
                m = L.head_group[h] == gi
                if not bool(m.any()):
                    continue
                loc = L.head_local[h[m]]
            bb = b[m]
            self._grow(S, int(L.lengths[bb, h[m]].max()) + 1, L.on_host)
            if S.log_weight is None:
                S.log_weight = torch.zeros(S.positions.shape, dtype=torch.float32, device=self.device)
            s = L.lengths[bb, h[m]]
            hd = S.k.device
            S.k[bb.to(hd), loc.to(hd), s.to(hd)] = k[m].to(device=hd, dtype=self.dtype)
            S.v[bb.to(hd), loc.to(hd), s.to(hd)] = v[m].to(device=hd, dtype=self.dtype)
            S.positions[bb, loc, s] = -1
            S.log_weight[bb, loc, s] = log_weight[m].float().to(self.device)
        L.lengths[b, h] += 1

    def shrink(self, layer: Optional[int] = None) -> None:
        """Give back capacity beyond each head group's longest row (after eviction), regrouping the
        KV heads by length (contiguous layout; see ``group_waste`` and the module docstring)."""
        for i in ([layer] if layer is not None else range(self.n_layers)):
            L = self._layer(i)
            if self.layout != "contiguous" or L.on_host or L.quant is not None:
                continue
            longest = L.lengths.amax(0).tolist() if self.batch else [0] * self.kv_heads  # [H]
            parts = head_groups(longest, self.group_waste)
            H = self.kv_heads
            if L.groups is None:
                old_gid, old_loc = [0] * H, list(range(H))
            else:
                old_gid, old_loc = L.head_group.tolist(), L.head_local.tolist()
            old = self._stores(L)
            new = []
            for heads in parts:
                cap = max(longest[h] for h in heads)
                d = {}
                for name, fill in (("k", 0), ("v", 0), ("positions", -1), ("log_weight", 0.0)):
                    srcs = [getattr(old[old_gid[h]][0], name) for h in heads]
                    ref = next((x for x in srcs if x is not None), None)
                    if ref is None:
                        d[name] = None
                        continue
                    x = torch.full((self.batch, len(heads), cap, *ref.shape[3:]), fill, dtype=ref.dtype,
                                   device=ref.device)
                    for j, h in enumerate(heads):
                        src = getattr(old[old_gid[h]][0], name)
                        if src is not None:
                            x[:, j] = src[:, old_loc[h], :cap]
                    d[name] = x
                hs = torch.tensor(heads, dtype=torch.long, device=self.device)
                new.append(_Group(hs, d["k"], d["v"], d["positions"], d["log_weight"]))
            if len(new) == 1:
                g = new[0]
                L.k, L.v, L.positions, L.log_weight = g.k, g.v, g.positions, g.log_weight
                L.groups = L.head_group = L.head_local = None
            else:
                gid, loc = [0] * H, [0] * H
                for gi, heads in enumerate(parts):
                    for j, h in enumerate(heads):
                        gid[h], loc[h] = gi, j
                L.groups = new
                L.head_group = torch.tensor(gid, dtype=torch.long, device=self.device)
                L.head_local = torch.tensor(loc, dtype=torch.long, device=self.device)
                L.k = L.v = L.positions = L.log_weight = None

    def load_layer(self, layer: int, k: Tensor, v: Tensor, lengths: Tensor, positions: Tensor, seen: Tensor,
                   log_weight: Optional[Tensor] = None) -> None:
        """Adopt external slot-major rows as layer ``layer`` (contiguous layout), e.g. to run a policy on
        another cache's tensors: ``k, v [B, Hkv, T, D]`` with row (b, h) holding ``lengths[b, h]``
        slots first; ``positions [B, Hkv, T]`` (original token positions, -1 for merged slots);
        ``seen [B]`` tokens appended so far; optional ``log_weight [B, Hkv, T]``. Slots beyond
        ``lengths`` are cleared (in a copy)."""
        L = self._layer(layer)
        if self.layout != "contiguous":
            raise _err("layout", "'contiguous' to load external rows", self.layout)
        B, H, D = self.batch, self.kv_heads, self.head_dim
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[:2]) != (B, H) or x.shape[3] != D:
                raise _err(name, f"a tensor [{B}, {H}, T, {D}]", getattr(x, "shape", type(x).__name__))
        T = k.shape[2]
        if v.shape != k.shape:
            raise _err("v", f"shape {tuple(k.shape)} (as k)", tuple(v.shape))
        lengths = torch.as_tensor(lengths, device=self.device).long()
        if tuple(lengths.shape) != (B, H) or (lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > T)):
            raise _err("lengths", f"a [{B}, {H}] tensor of values in [0, {T}]", getattr(lengths, "shape", lengths))
        if not isinstance(positions, Tensor) or tuple(positions.shape) != (B, H, T):
            raise _err("positions", f"a tensor [{B}, {H}, {T}]", getattr(positions, "shape", type(positions).__name__))
        seen = torch.as_tensor(seen, device=self.device).long()
        if tuple(seen.shape) != (B,):
            raise _err("seen", f"a [{B}] tensor", tuple(seen.shape))
        if log_weight is not None and (not isinstance(log_weight, Tensor) or tuple(log_weight.shape) != (B, H, T)):
            raise _err("log_weight", f"None or a tensor [{B}, {H}, {T}]", getattr(log_weight, "shape", None))
        dead = torch.arange(T, device=self.device) >= lengths[..., None]
        L.k = k.to(device=self.device, dtype=self.dtype).masked_fill(dead[..., None], 0)
        L.v = v.to(device=self.device, dtype=self.dtype).masked_fill(dead[..., None], 0)
        L.positions = positions.to(self.device).long().masked_fill(dead, -1)
        L.log_weight = None if log_weight is None else log_weight.to(self.device).float().masked_fill(dead, 0.0)
        L.lengths = lengths.clone()
        L.seen = seen.clone()
        L.on_host, L.quant = False, None
        L.groups = L.head_group = L.head_local = None

    def set_quantized(self, layer: int, mpkv) -> None:
        """Replace a layer's K/V by a mixed-precision (ZipVL) store; its bytes are what is kept."""
        L = self._layer(layer)
        L.quant = mpkv
        L.groups = L.head_group = L.head_local = None
        L.k = L.v = None
        L.log_weight = None
        L.positions = mpkv.positions
        L.lengths = mpkv.lengths.clone()

    # ------------------------------------------------------------------ offload
    def offload(self, layer: int) -> None:
        """Move the layer's K/V to host memory (pinned when CUDA is available)."""
        L = self._layer(layer)
        if L.on_host:
            return
        if L.quant is not None:
            raise ValueError("layer: quantised layers are kept on the device")
        pin = torch.cuda.is_available()
        for S, _ in self._stores(L):
            hk = torch.empty(S.k.shape, dtype=S.k.dtype, device="cpu", pin_memory=pin)
            hv = torch.empty(S.v.shape, dtype=S.v.dtype, device="cpu", pin_memory=pin)
            hk.copy_(S.k)
            hv.copy_(S.v)
            S.k, S.v = hk, hv
        L.on_host = True

    def fetch(self, layer: int) -> None:
        """Bring an offloaded layer's K/V back to the device."""
        L = self._layer(layer)
        if not L.on_host:
            return
        for S, _ in self._stores(L):
            S.k = S.k.to(self.device)
            S.v = S.v.to(self.device)
        L.on_host = False

    def prefetch(self, layer: int, pattern: TokenPattern) -> Prefetched:
        """Copy the rows selected by a slot-indexed ``pattern`` (heads 1 or Hkv) of an offloaded layer
        to the device, asynchronously (on a side stream on CUDA; call ``.wait()`` before use)."""
        L = self._layer(layer)
        if not L.on_host:
            raise ValueError("layer: is not offloaded (call offload() first, or use gather())")
        kl = self.kv_lens(layer).cpu()
        tok, valid = _pattern_rows(pattern.to("cpu"), kl, self.batch, self.kv_heads)
        if self.layout == "paged":
            T = L.block_table.shape[1] * self.page_size
            kc = paged_to_contiguous(L.k, L.block_table.cpu().clamp_min(0), T)
            vc = paged_to_contiguous(L.v, L.block_table.cpu().clamp_min(0), T)
        elif L.groups is None:
            kc, vc = L.k, L.v
        else:
            kc = vc = None  # gathered group by group below
        t = torch.where(valid, tok, torch.zeros_like(tok))
        # compact: valid rows first so that the device pattern is a prefix of each row
        order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
        t = torch.gather(t, 2, order)
        cnt = valid.sum(-1)
        pin = torch.cuda.is_available()
        g = t[..., None].expand(-1, -1, -1, self.head_dim)
        sk = torch.empty(g.shape, dtype=self.dtype, pin_memory=pin)  # gathered straight into pinned memory
        sv = torch.empty(g.shape, dtype=self.dtype, pin_memory=pin)
        if kc is not None:
            torch.gather(kc, 2, g, out=sk)
            torch.gather(vc, 2, g, out=sv)
        else:
            self._gather_groups(L, t, torch.gather(valid, 2, order), out=(sk, sv))
        lw = None
        lw_all = self.log_weights(layer) if self.layout == "contiguous" else None
        if lw_all is not None:
            lw = torch.gather(lw_all.cpu(), 2, t)
        n = max(t.shape[-1], 1)
        idx = torch.arange(n, dtype=torch.int32).expand(self.batch, tok.shape[1], n).contiguous()
        event = None
        if self.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._stream):
                dk = sk.to(self.device, non_blocking=True)
                dv = sv.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            dk, dv = sk.clone(), sv.clone()
        pat = TokenPattern(idx.to(self.device), cnt.to(torch.int32).to(self.device), t.shape[-1])
        if lw is not None:
            lw = lw.to(self.device)
        return Prefetched(dk, dv, pat, lw, event)

    # ------------------------------------------------------------------ memory
    def nbytes(self, layer: Optional[int] = None) -> int:
        """Bytes kept (device and host): K/V storage (or quantised codes) plus slot metadata (per head
        group on a grouped layer, so per-head eviction frees storage; see the module docstring)."""
        total = 0
        for i in ([layer] if layer is not None else range(self.n_layers)):
            L = self.layers[i]
            if L.lengths is None:
                continue
            if L.quant is not None:
                total += L.quant.nbytes()
            ts = [L.k, L.v, L.positions, L.log_weight, L.block_table, L.lengths, L.head_group, L.head_local]
            for g in L.groups or []:
                ts += [g.heads, g.k, g.v, g.positions, g.log_weight]
            for t in ts:
                if t is not None and not (L.quant is not None and t is L.positions):
                    total += t.numel() * t.element_size()
        return total

    def used_bytes(self, layer: Optional[int] = None) -> int:
        """Bytes of the K/V slots in use (lengths × D × 2 × itemsize), independent of capacity."""
        total = 0
        item = torch.empty(0, dtype=self.dtype).element_size()
        for i in ([layer] if layer is not None else range(self.n_layers)):
            L = self.layers[i]
            if L.lengths is None:
                continue
            if L.quant is not None:
                total += L.quant.nbytes()
                continue
            n = int(L.lengths.sum()) * (self.kv_heads if self.layout == "paged" else 1)
            total += 2 * n * self.head_dim * item
        return total


def _pattern_rows(pattern: TokenPattern, kv_lens: Tensor, B: int, H: int):
    """Slot positions ``[B, H, n]`` and validity of a pattern (pages expanded; heads 1 or H)."""
    if pattern.heads not in (1, H):
        raise _err("pattern heads", f"1 or {H} (kv heads)", pattern.heads)
    if pattern.batch not in (1, B):
        raise _err("pattern batch", f"1 or {B}", pattern.batch)
    from ..kernels.sparse_decode.reference import selected_tokens

    tok, valid, _ = selected_tokens(pattern, kv_lens.to(pattern.device), pattern.kv_len, pattern.heads)
    if tok.shape[0] != B or tok.shape[1] != H:  # broadcast a shared selection to every sequence / kv head
        tok, valid = tok.expand(B, H, -1), valid.expand(B, H, -1)
    return tok, valid


__all__ = ["KVCache", "Prefetched"]
