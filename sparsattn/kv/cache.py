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

Head groups (contiguous layout): each contiguous layer is a ``sparsattn.kv.store.HeadGroupStore``, the
one head-group storage (shared with ``sparsattn.integrations.hf.SparseCache``). After per-head eviction
the rows of different KV heads can have very different lengths (RazorAttention's retrieval heads keep
everything, MoA's spans differ per head). ``shrink()`` then partitions the layer's KV heads into
*groups* of similar length, each stored as its own ``[B, H_g, cap_g, D]`` tensor (``cap_g`` = the
longest row of the group), so storage follows the per-head lengths. Rule (deterministic): heads are ordered by their longest row (over the batch),
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

from typing import Optional

import torch

from ..kernels.sparse_decode import sparse_decode_attention
from ..kernels.sparse_decode.reference import paged_to_contiguous
from ..patterns import TokenPattern
from ..patterns._util import _err  # the library's one error-message helper
from .offload import OffloadMixin, Prefetched, _pattern_rows
from .store import HeadGroupStore

Tensor = torch.Tensor


class _Layer:
    """One layer: a ``HeadGroupStore`` (contiguous layout) or a page pool ``k, v`` with a block table
    (paged); ``seen [B]`` tokens appended so far; a ZipVL store (``quant``) replaces the K/V."""

    def __init__(self):
        self.store: Optional[HeadGroupStore] = None
        self._k = self._v = None  # paged pool [n_pages, Hkv, page_size, D]
        self._lengths: Optional[Tensor] = None  # [B] (paged) or [B, H] (quantised layer)
        self.positions: Optional[Tensor] = None  # quantised layer
        self.seen: Optional[Tensor] = None
        self.block_table: Optional[Tensor] = None
        self.n_used_pages = 0
        self._on_host = False
        self.quant = None

    @property
    def k(self):
        """The K storage: the page pool, or the store's tensor when it is one group (None when grouped)."""
        if self.store is not None:
            return self.store.groups[0].k if len(self.store.groups) == 1 else None
        return self._k

    @k.setter
    def k(self, x):
        self._k = x

    @property
    def v(self):
        if self.store is not None:
            return self.store.groups[0].v if len(self.store.groups) == 1 else None
        return self._v

    @v.setter
    def v(self, x):
        self._v = x

    @property
    def lengths(self) -> Optional[Tensor]:
        """Slots kept: ``[B, Hkv]`` (the store's, or a quantised layer's) or ``[B]`` (paged); None before use."""
        return self.store.lengths if self.store is not None else self._lengths

    @lengths.setter
    def lengths(self, x):
        if self.store is not None:
            self.store.lengths = x
        else:
            self._lengths = x

    @property
    def groups(self) -> Optional[list]:
        """The store's ``HeadGroup`` list when the layer is stored as several head groups, else None."""
        return None if self.store is None or len(self.store.groups) == 1 else self.store.groups

    @property
    def on_host(self) -> bool:
        return self.store.on_host if self.store is not None else self._on_host

    @on_host.setter
    def on_host(self, val: bool):
        if self.store is not None:
            self.store.on_host = val
        else:
            self._on_host = val


class KVCache(OffloadMixin):
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
        if L.seen is None:
            B, H = self.batch, self.kv_heads
            dev = self.device
            L.seen = torch.zeros(B, dtype=torch.long, device=dev)
            if self.layout == "contiguous":
                L.store = HeadGroupStore(B, H, self.head_dim, dtype=self.dtype, device=dev, capacity=self._cap0)
            else:
                P = self.page_size
                n = max(1, -(-self._cap0 // P)) * B
                L.k = torch.zeros(n, H, P, self.head_dim, dtype=self.dtype, device=dev)
                L.v = torch.zeros_like(L.k)
                L.lengths = torch.zeros(B, dtype=torch.long, device=dev)
                L.block_table = torch.zeros(B, 0, dtype=torch.int32, device=dev)
        return L

    def store(self, layer: int) -> HeadGroupStore:
        """The layer's ``HeadGroupStore`` (contiguous layout, not quantised): the storage itself, not a copy."""
        L = self._layer(layer)
        if L.store is None:
            raise ValueError(f"layer: {layer} has no head-group store (paged layout or quantised)")
        return L.store

    def adopt_store(self, layer: int, store: HeadGroupStore, seen: Tensor) -> None:
        """Make ``store`` (no copy) layer ``layer`` with ``seen [B]`` tokens appended so far (contiguous
        layout): a policy run on this cache then edits that store in place."""
        L = self._layer(layer)
        if self.layout != "contiguous":
            raise _err("layout", "'contiguous' to adopt a store", self.layout)
        if (store.batch, store.kv_heads, store.head_dim) != (self.batch, self.kv_heads, self.head_dim):
            raise _err("store", f"sizes {(self.batch, self.kv_heads, self.head_dim)}",
                       (store.batch, store.kv_heads, store.head_dim))
        L.store, L.seen, L.quant, L._lengths, L.positions = store, torch.as_tensor(seen, device=self.device).long(), \
            None, None, None

    def _check_resident(self, L: _Layer, name: str):
        if L.on_host:
            raise ValueError(f"layer: is offloaded to host memory; call fetch() or prefetch() before {name}")

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
        if self.layout == "contiguous":
            L.store.append(k, v, lens, L.seen)
        else:
            ok = torch.arange(t, device=self.device)[None, :] < lens[:, None]  # [B, t]
            P = self.page_size
            self._grow_pages(L, -(-(L.lengths + lens) // P))
            bi, ti = ok.nonzero(as_tuple=True)
            tok = L.lengths[bi] + ti
            pg = L.block_table[bi, tok // P].long()
            hd = L.k.device  # host memory when offloaded
            L.k[pg.to(hd), :, (tok % P).to(hd)] = k[bi, :, ti].to(hd)
            L.v[pg.to(hd), :, (tok % P).to(hd)] = v[bi, :, ti].to(hd)
            L.lengths += lens
        L.seen += lens

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
                if L.on_host and torch.cuda.is_available() and not L.k.is_pinned():
                    L.k, L.v = L.k.pin_memory(), L.v.pin_memory()
            ids = torch.arange(L.n_used_pages, L.n_used_pages + n_new, device=self.device, dtype=torch.int32)
            bt[missing] = ids
            L.n_used_pages += n_new
        # unallocated tail entries point at page 0 (never read: beyond kv_lens)
        L.block_table = bt

    # ------------------------------------------------------------------ read
    def get(self, layer: int):
        """``(k, v)`` as ``[B, Hkv, T, D]`` slot-major tensors (paged layouts are gathered; ZipVL
        layers are dequantised; grouped layers are materialised into new padded tensors; one head
        group: the storage itself). Slots beyond ``lengths`` hold zeros."""
        L = self._layer(layer)
        self._check_resident(L, "get")
        if L.quant is not None:
            return L.quant.dequantize()
        if L.store is not None:
            return L.store.padded("k"), L.store.padded("v")
        T = L.block_table.shape[1] * self.page_size
        bt = L.block_table.clamp_min(0)
        return paged_to_contiguous(L.k, bt, T), paged_to_contiguous(L.v, bt, T)

    def positions(self, layer: int) -> Tensor:
        """Original token position of every slot ``[B, Hkv, T]`` (-1: empty or merged slot; a new
        tensor on a grouped layer)."""
        L = self._layer(layer)
        if L.store is not None:
            return L.store.padded("positions")
        if self.layout == "paged":
            T = L.block_table.shape[1] * self.page_size
            p = torch.arange(T, device=self.device).expand(self.batch, self.kv_heads, T)
            return torch.where(p < L.lengths[:, None, None], p, torch.full_like(p, -1))
        return L.positions

    def log_weights(self, layer: int) -> Optional[Tensor]:
        """Per-slot log-weight ``[B, Hkv, T]`` (log of the tokens a slot stands for), or None (a new
        tensor on a grouped layer)."""
        L = self._layer(layer)
        return None if L.store is None else L.store.padded("log_weight")

    def gather(self, layer: int, pattern: TokenPattern):
        """Selected slots ``(k, v) [B, Hkv, n, D]`` for a slot-indexed pattern (heads 1 or Hkv)."""
        L = self._layer(layer)
        tok, valid = _pattern_rows(pattern, self.kv_lens(layer), self.batch, self.kv_heads)
        if L.store is not None:
            self._check_resident(L, "gather")
            return L.store.gather(tok.to(self.device), valid.to(self.device))
        k, v = self.get(layer)
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
        kw = dict(scale=scale, return_lse=return_lse, backend=backend, validate=validate)
        if L.store is not None:
            return L.store.attend(q, pattern, **kw)
        if L.quant is None:  # paged
            T = L.block_table.shape[1] * self.page_size
            if pattern is not None and pattern.kv_len != T:
                raise _err("pattern.kv_len", f"{T} (the cache's slot count)", pattern.kv_len)
            return sparse_decode_attention(q, L.k, L.v, pattern, kv_lens=self.kv_lens(layer),
                                           block_table=L.block_table.clamp_min(0), **kw)
        k, v = L.quant.dequantize()  # a ZipVL layer: attention on the dequantised rows
        st = HeadGroupStore.from_rows(k, v, L.quant.lengths, L.positions, adopt=True)
        return st.attend(q, pattern, **kw)

    # ------------------------------------------------------------------ eviction
    def _writable(self, layer: int, what: str) -> _Layer:
        L = self._layer(layer)
        self._check_resident(L, what)
        if self.layout != "contiguous":
            raise _err("layout", f"'contiguous' for {'per-head eviction' if what == 'evict' else 'merged slots'}",
                       self.layout)
        if L.quant is not None:
            raise ValueError(f"layer: holds a quantised (ZipVL) cache; it cannot "
                             f"{'evict slots' if what == 'evict' else 'take merged slots'}")
        return L

    def evict(self, layer: int, keep: Tensor) -> None:
        """Keep only the slots where ``keep [B, Hkv, T]`` is True (per (batch, head)); rows are
        compacted in order. Slots beyond ``lengths`` are ignored."""
        L = self._writable(layer, "evict")
        T = L.store.slots()
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (self.batch, self.kv_heads, T):
            raise _err("keep", f"a bool tensor [{self.batch}, {self.kv_heads}, {T}]", getattr(keep, "shape", None))
        L.store.evict(keep.to(self.device))

    def write_slot(self, layer: int, b: Tensor, h: Tensor, k: Tensor, v: Tensor, log_weight: Tensor) -> None:
        """Append one merged slot per listed (b, h) with its key/value and log-weight (position -1)."""
        L = self._writable(layer, "write_slot")
        L.store.write_slot(b, h, k, v, log_weight)

    def shrink(self, layer: Optional[int] = None) -> None:
        """Give back capacity beyond each head group's longest row (after eviction), regrouping the
        KV heads by length (contiguous layout; see ``group_waste`` and the module docstring)."""
        for i in ([layer] if layer is not None else range(self.n_layers)):
            L = self._layer(i)
            if L.store is not None and not L.on_host:
                L.store.regroup(self.group_waste)

    def load_layer(self, layer: int, k: Tensor, v: Tensor, lengths: Tensor, positions: Tensor, seen: Tensor,
                   log_weight: Optional[Tensor] = None, *, adopt: bool = False) -> None:
        """Adopt external slot-major rows as layer ``layer`` (contiguous layout), e.g. to run a policy on
        another cache's tensors: ``k, v [B, Hkv, T, D]`` with row (b, h) holding ``lengths[b, h]``
        slots first; ``positions [B, Hkv, T]`` (original token positions, -1 for merged slots);
        ``seen [B]`` tokens appended so far; optional ``log_weight [B, Hkv, T]``. Slots beyond
        ``lengths`` are cleared (in a copy); ``adopt=True``: the caller guarantees they already hold 0
        (positions -1), and the tensors are adopted as the storage without a copy."""
        self._layer(layer)  # checks the index
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
        st = HeadGroupStore.from_rows(k, v, lengths, positions, log_weight, adopt=adopt, dtype=self.dtype,
                                      device=self.device)
        self.adopt_store(layer, st, seen.clone())

    def set_quantized(self, layer: int, mpkv) -> None:
        """Replace a layer's K/V by a mixed-precision (ZipVL) store; its bytes are what is kept."""
        L = self._layer(layer)
        L.quant, L.store = mpkv, None
        L.positions = mpkv.positions
        L.lengths = mpkv.lengths.clone()

    # ------------------------------------------------------------------ memory
    def nbytes(self, layer: Optional[int] = None) -> int:
        """Bytes kept (device and host): K/V storage (or quantised codes) plus slot metadata (per head
        group on a grouped layer, so per-head eviction frees storage; see the module docstring)."""
        total = 0
        for i in ([layer] if layer is not None else range(self.n_layers)):
            L = self.layers[i]
            if L.seen is None:
                continue
            if L.store is not None:
                total += L.store.nbytes()
                continue
            if L.quant is not None:
                total += L.quant.nbytes()
            for t in (L.k, L.v, L.block_table, L.lengths):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def used_bytes(self, layer: Optional[int] = None) -> int:
        """Bytes of the K/V slots in use (lengths × D × 2 × itemsize), independent of capacity."""
        total = 0
        item = torch.empty(0, dtype=self.dtype).element_size()
        for i in ([layer] if layer is not None else range(self.n_layers)):
            L = self.layers[i]
            if L.seen is None:
                continue
            if L.quant is not None:
                total += L.quant.nbytes()
                continue
            n = int(L.lengths.sum()) * (self.kv_heads if self.layout == "paged" else 1)
            total += 2 * n * self.head_dim * item
        return total


__all__ = ["KVCache", "Prefetched"]
