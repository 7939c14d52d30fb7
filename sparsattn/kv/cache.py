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

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.sparse_decode import sparse_decode_attention
from ..kernels.sparse_decode.reference import paged_to_contiguous
from ..patterns import TokenPattern
from .groups import GroupedLayerMixin, materialise
from .offload import OffloadMixin, Prefetched, _pattern_rows

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



class KVCache(GroupedLayerMixin, OffloadMixin):
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
        return materialise([(g.heads, getattr(g, name)) for g in L.groups], self.batch, self.kv_heads, self._cap(L),
                           fill, left=False)

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


    def load_layer(self, layer: int, k: Tensor, v: Tensor, lengths: Tensor, positions: Tensor, seen: Tensor,
                   log_weight: Optional[Tensor] = None, *, adopt: bool = False) -> None:
        """Adopt external slot-major rows as layer ``layer`` (contiguous layout), e.g. to run a policy on
        another cache's tensors: ``k, v [B, Hkv, T, D]`` with row (b, h) holding ``lengths[b, h]``
        slots first; ``positions [B, Hkv, T]`` (original token positions, -1 for merged slots);
        ``seen [B]`` tokens appended so far; optional ``log_weight [B, Hkv, T]``. Slots beyond
        ``lengths`` are cleared (in a copy); ``adopt=True``: the caller guarantees they already hold 0 (positions
        -1), and the tensors are adopted as the storage without a copy (``as_cache_policy`` passes fresh
        tensors from ``left_to_slots``)."""
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
        if adopt:  # the caller guarantees cleared slots beyond lengths: the tensors become the storage
            L.k = k.to(device=self.device, dtype=self.dtype)
            L.v = v.to(device=self.device, dtype=self.dtype)
            L.positions = positions.to(self.device).long()
            L.log_weight = None if log_weight is None else log_weight.to(self.device).float()
        else:
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


__all__ = ["KVCache", "Prefetched"]
