"""store: HeadGroupStore, the one K/V storage of a layer by KV head group (used by KVCache and SparseCache).

Layout (slot-major): row (b, h) holds ``lengths[b, h]`` slots first; slot ``s`` stores the key/value of
the token at original position ``positions[b, h, s]`` (-1: a merged slot standing for
``exp(log_weight[b, h, s])`` tokens, or empty). The layer's KV heads are partitioned into *head groups*,
each its own ``[B, H_g, cap_g, D]`` tensor (``HeadGroup``); one group = the plain single-tensor layout.
After per-head eviction the rows of different heads can have very different lengths (RazorAttention's
retrieval heads keep everything, MoA's spans differ per head): ``regroup(waste)`` re-partitions the heads
by their longest row (``sparsattn.kv.groups.head_groups``) so that memory follows the per-head lengths.

Operations: ``append`` (new tokens after each row's slots), ``evict`` (keep a mask of slots, rows
compacted in order), ``write_slot`` (merged slots), ``regroup``, ``gather`` (selected rows), ``attend``
(one decode query per query head: the sparse decode kernel once per group on its query heads, exact
since a query head only reads its own KV head) and ``attend_causal`` (the last Tq slots of every row
are the queries; both take Gemma 2's ``softcap`` and gpt-oss's ``sinks``), ``padded`` (a ``[B, Hkv, T, ...]`` tensor: the storage itself for one group, a
materialised copy for several, slot-major or left-padded) and ``nbytes``.
``sparsattn.kv.KVCache`` keeps one store per contiguous layer; ``sparsattn.integrations.hf.SparseCache``
keeps one per layer whose KV heads keep different lengths; KV policies run on the store in place
(``sparsattn.kv.adapter``), with no padded copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels._checks import check_sinks
from ..patterns import TokenPattern
from ..patterns._util import _err  # the library's one error-message helper
from .groups import group_query_heads, head_groups
from .store_attend import attend_groups, attend_one, attend_rows

Tensor = torch.Tensor

_FILL = {"k": 0, "v": 0, "positions": -1, "log_weight": 0.0}


def slots_to_left(x: Tensor, n: Tensor, T_out: int, fill=0) -> Tensor:
    """Slot-major rows ``x [B, H, T, ...]`` (``n[b, h]`` valid first) -> ``[B, H, T_out, ...]`` with the
    valid entries at the end (left padding with ``fill``); a view of ``x`` when every row is full."""
    B, H = x.shape[:2]
    tail = x.shape[3:]
    if x.shape[2] >= T_out and bool((n == T_out).all()):
        return x[:, :, :T_out]
    if x.shape[2] == 0:
        return x.new_full((B, H, T_out, *tail), fill)
    src = torch.arange(T_out, device=x.device) - (T_out - n.long().to(x.device))[..., None]  # [B, H, T_out]
    ok = src >= 0
    src = src.clamp(min=0, max=max(x.shape[2] - 1, 0))
    g = src.view(B, H, T_out, *([1] * len(tail))).expand(B, H, T_out, *tail)
    out = torch.gather(x, 2, g)
    return out.masked_fill(~ok.view(B, H, T_out, *([1] * len(tail))), fill)


def left_to_slots(x: Tensor, n: Tensor, fill=0) -> Tensor:
    """Rows ``x [B, H, T, ...]`` whose valid entries are the last ``n[b, h]`` -> slot-major (valid
    entries first, in order; ``fill`` after). A new tensor."""
    B, H, T = x.shape[:3]
    src = torch.arange(T, device=x.device) + (T - n.long().to(x.device))[..., None]  # [B, H, T]
    ok = src < T
    src = src.clamp(max=max(T - 1, 0))
    g = src.view(B, H, T, *([1] * (x.dim() - 3))).expand(x.shape)
    out = torch.gather(x, 2, g)
    return out.masked_fill(~ok.view(B, H, T, *([1] * (x.dim() - 3))), fill)


@dataclass
class HeadGroup:
    """HeadGroup: KV heads of one layer stored together, rows slot-major (see the module docstring).

    Attributes:
        heads: int64 ``[H_g]`` KV head ids (ascending).
        k, v: ``[B, H_g, cap, D]`` (``keys`` / ``values`` are aliases).
        positions: int64 ``[B, H_g, cap]`` original token positions (-1: empty or merged slot).
        log_weight: None or float32 ``[B, H_g, cap]`` per-slot log-weights.
    """

    heads: Tensor
    k: Tensor
    v: Tensor
    positions: Tensor
    log_weight: Optional[Tensor] = None

    @property
    def keys(self) -> Tensor:
        return self.k

    @property
    def values(self) -> Tensor:
        return self.v

    @property
    def cap(self) -> int:
        """Slots allocated per row."""
        return self.k.shape[2]


class HeadGroupStore:
    """HeadGroupStore: one layer's K/V of ``batch`` sequences x ``kv_heads`` heads stored by head group.

    Args:
        batch, kv_heads, head_dim: sizes; dtype, device: of the K/V storage.
        capacity: initial slots per row.
        exact: grow capacity to exactly what an append needs (SparseCache: memory = slots) instead of
            doubling (KVCache: amortised appends).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, *, dtype=torch.float16, device="cpu",
                 capacity: int = 0, exact: bool = False):
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.dtype, self.device, self.exact = dtype, torch.device(device), exact
        B, H, dev = batch, kv_heads, self.device
        self.lengths = torch.zeros(B, H, dtype=torch.long, device=dev)
        k = torch.zeros(B, H, capacity, head_dim, dtype=dtype, device=dev)
        self.groups = [HeadGroup(torch.arange(H, device=dev), k, torch.zeros_like(k),
                                 torch.full((B, H, capacity), -1, dtype=torch.long, device=dev))]
        self.head_group: Optional[Tensor] = None  # [H] group of each kv head (several groups)
        self.head_local: Optional[Tensor] = None  # [H] index of each kv head inside its group
        self.on_host = False  # K/V in host memory (KVCache.offload)

    @classmethod
    def from_rows(cls, k: Tensor, v: Tensor, lengths: Tensor, positions: Tensor,
                  log_weight: Optional[Tensor] = None, *, adopt: bool = False, exact: bool = False,
                  dtype=None, device=None) -> "HeadGroupStore":
        """A one-group store of slot-major rows ``k, v [B, H, T, D]`` (``lengths [B, H]`` valid first),
        ``positions [B, H, T]``, optional ``log_weight``. Slots past ``lengths`` are cleared in a copy;
        ``adopt=True``: the caller guarantees they are clear and the tensors become the storage."""
        B, H, T, D = k.shape
        dtype = k.dtype if dtype is None else dtype
        device = k.device if device is None else torch.device(device)
        st = cls(B, H, D, dtype=dtype, device=device, exact=exact)
        lengths = lengths.to(device).long()
        k, v = k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
        positions = positions.to(device).long()
        lw = None if log_weight is None else log_weight.to(device).float()
        if not adopt:
            dead = torch.arange(T, device=device) >= lengths[..., None]
            k, v = k.masked_fill(dead[..., None], 0), v.masked_fill(dead[..., None], 0)
            positions = positions.masked_fill(dead, -1)
            lw = None if lw is None else lw.masked_fill(dead, 0.0)
        st.lengths = lengths.clone()
        st.groups = [HeadGroup(torch.arange(H, device=device), k, v, positions, lw)]
        return st

    # ------------------------------------------------------------------ layout
    def parts(self):
        """``[(group, heads or None)]``: heads None for the single-group layout (every head, in order)."""
        if len(self.groups) == 1:
            return [(self.groups[0], None)]
        return [(g, g.heads) for g in self.groups]

    def slots(self) -> int:
        """Slot count ``T`` of the padded view (the largest group capacity)."""
        return max(g.cap for g in self.groups)

    def kv_lens(self) -> Tensor:
        """Longest row per sequence ``[B]`` int32."""
        return self.lengths.amax(1).to(torch.int32) if self.kv_heads else self.lengths.new_zeros(self.batch)

    def padded(self, name: str, *, left: bool = False, slots: Optional[int] = None) -> Optional[Tensor]:
        """``name`` (k, v, positions, log_weight) as one ``[B, Hkv, T, ...]`` tensor, T = ``slots()``: the
        storage itself for one group (slot-major), else a materialised copy; ``left=True``: each row's
        valid slots at the end of ``slots`` (default ``slots()``) slots (a view when every row is full).
        None when no group has it."""
        fill = _FILL[name]
        ref = next((getattr(g, name) for g in self.groups if getattr(g, name) is not None), None)
        if ref is None:
            return None
        T = self.slots() if slots is None or not left else slots
        if len(self.groups) == 1:
            x = getattr(self.groups[0], name)
            return slots_to_left(x, self.lengths.to(x.device), T, fill) if left else x
        out = torch.full((self.batch, self.kv_heads, T, *ref.shape[3:]), fill, dtype=ref.dtype, device=ref.device)
        for g in self.groups:
            x = getattr(g, name)
            if x is None:
                continue
            hs = g.heads.to(out.device)
            if left:
                out[:, hs] = slots_to_left(x, self.lengths[:, g.heads].to(x.device), T, fill)
            else:
                out[:, hs, :g.cap] = x
        return out

    def map(self, fn, names=("k", "v", "positions", "log_weight")) -> None:
        """Apply ``fn`` to the per-batch tensors ``names`` of every group (device moves, beam reordering)."""
        for g in self.groups:
            for n in names:
                x = getattr(g, n)
                if x is not None:
                    setattr(g, n, fn(x))

    # ------------------------------------------------------------------ writes
    def _grow(self, g: HeadGroup, need: int) -> None:
        """Grow a group's capacity to at least ``need`` slots (exactly, or doubling)."""
        cap = g.cap
        if need <= cap:
            return
        pad = need - cap if self.exact else max(need, 2 * cap, 16) - cap
        g.k = torch.cat([g.k, g.k.new_zeros(*g.k.shape[:2], pad, g.k.shape[3])], 2)
        g.v = torch.cat([g.v, g.v.new_zeros(*g.v.shape[:2], pad, g.v.shape[3])], 2)
        g.positions = torch.cat([g.positions, g.positions.new_full((*g.positions.shape[:2], pad), -1)], 2)
        if g.log_weight is not None:
            g.log_weight = torch.cat([g.log_weight, g.log_weight.new_zeros(*g.log_weight.shape[:2], pad)], 2)
        if self.on_host and torch.cuda.is_available() and not g.k.is_pinned():
            g.k, g.v = g.k.pin_memory(), g.v.pin_memory()

    def append(self, k: Tensor, v: Tensor, lens: Tensor, first: Tensor) -> None:
        """Append ``k, v [B, Hkv, t, D]`` (storage dtype/device) after each row's slots; ``lens [B]``
        valid new tokens per sequence (right-padded beyond), ``first [B]`` the position of the first
        (None: positions unknown, stored as -1)."""
        if first is None:
            first = torch.full((self.batch,), -1, dtype=torch.long, device=self.device)
            step = 0
        else:
            step = 1
        B, t = self.batch, k.shape[2]
        dev = self.device
        j = torch.arange(t, device=dev)
        ok = j[None, :] < lens[:, None]  # [B, t]
        if self.exact and len(self.groups) and bool(ok.all()) and bool((self.lengths == self.lengths[:1, :1]).all()):
            n0 = int(self.lengths[0, 0]) if self.lengths.numel() else 0
            if all(g.cap == n0 for g in self.groups):  # every row full: plain concatenation (no scatter)
                for g, hs in self.parts():
                    ks, vs = (k, v) if hs is None else (k[:, hs.to(k.device)], v[:, hs.to(v.device)])
                    g.k, g.v = torch.cat([g.k, ks.to(g.k.device)], 2), torch.cat([g.v, vs.to(g.v.device)], 2)
                    p = (first[:, None, None] + step * j).expand(B, g.heads.numel(), t)
                    g.positions = torch.cat([g.positions, p], 2)
                    if g.log_weight is not None:
                        g.log_weight = torch.cat([g.log_weight, g.log_weight.new_zeros(*p.shape)], 2)
                self.lengths += t
                return
        for g, hs in self.parts():
            ln = self.lengths if hs is None else self.lengths[:, hs]
            ks, vs = (k, v) if hs is None else (k[:, hs.to(k.device)], v[:, hs.to(v.device)])
            Hs = ln.shape[1]
            self._grow(g, int((ln + lens[:, None]).max()) if B and Hs else 0)
            slots = ln[:, :, None] + j  # [B, Hs, t]
            bi, hi, ti = ok[:, None, :].expand(B, Hs, t).nonzero(as_tuple=True)
            si = slots[bi, hi, ti]
            hd = g.k.device  # host memory when offloaded
            g.k[bi.to(hd), hi.to(hd), si.to(hd)] = ks[bi, hi, ti].to(hd)
            g.v[bi.to(hd), hi.to(hd), si.to(hd)] = vs[bi, hi, ti].to(hd)
            g.positions[bi, hi, si] = first[bi] + step * ti
            if g.log_weight is not None:
                g.log_weight[bi, hi, si] = 0.0
        self.lengths += lens[:, None]

    def evict(self, keep: Tensor) -> None:
        """Keep only the slots where ``keep [B, Hkv, T]`` is True (T = ``slots()``); rows are compacted in
        order; slots past a row's length are ignored."""
        for g, hs in self.parts():
            ln = self.lengths if hs is None else self.lengths[:, hs]
            kp = keep if hs is None else keep[:, hs, :g.cap]
            T = g.cap
            live = torch.arange(T, device=self.device) < ln[..., None]
            kp = kp & live
            order = torch.sort((~kp).to(torch.int8), dim=-1, stable=True).indices  # kept slots first
            n = kp.sum(-1)
            dead = torch.arange(T, device=self.device) >= n[..., None]
            gi = order[..., None].expand(-1, -1, -1, g.k.shape[-1])
            g.k = torch.gather(g.k, 2, gi.to(g.k.device)).masked_fill_(dead[..., None].to(g.k.device), 0)
            g.v = torch.gather(g.v, 2, gi.to(g.v.device)).masked_fill_(dead[..., None].to(g.v.device), 0)
            g.positions = torch.gather(g.positions, 2, order).masked_fill_(dead, -1)
            if g.log_weight is not None:
                g.log_weight = torch.gather(g.log_weight, 2, order).masked_fill_(dead, 0)
            if hs is None:
                self.lengths = n
            else:
                self.lengths[:, hs] = n

    def write_slot(self, b: Tensor, h: Tensor, k: Tensor, v: Tensor, log_weight: Tensor) -> None:
        """Append one merged slot per listed (b, h) with its key/value and log-weight (position -1)."""
        if b.numel() == 0:
            return
        b, h = b.to(self.device).long(), h.to(self.device).long()
        for gi, (g, hs) in enumerate(self.parts()):
            if hs is None:
                m, loc = slice(None), h
            else:
                m = self.head_group[h] == gi
                if not bool(m.any()):
                    continue
                loc = self.head_local[h[m]]
            bb = b[m]
            self._grow(g, int(self.lengths[bb, h[m]].max()) + 1)
            if g.log_weight is None:
                g.log_weight = torch.zeros(g.positions.shape, dtype=torch.float32, device=self.device)
            s = self.lengths[bb, h[m]]
            hd = g.k.device
            g.k[bb.to(hd), loc.to(hd), s.to(hd)] = k[m].to(device=hd, dtype=self.dtype)
            g.v[bb.to(hd), loc.to(hd), s.to(hd)] = v[m].to(device=hd, dtype=self.dtype)
            g.positions[bb, loc, s] = -1
            g.log_weight[bb, loc, s] = log_weight[m].float().to(self.device)
        self.lengths[b, h] += 1

    def regroup(self, waste: float) -> None:
        """Give back capacity beyond each group's longest row and re-partition the heads by length
        (``head_groups(longest, waste)``); nothing is copied when the groups already fit."""
        H = self.kv_heads
        longest = self.lengths.amax(0).tolist() if self.batch else [0] * H
        parts = head_groups(longest, waste)
        if [g.heads.tolist() for g in self.groups] == parts and \
                all(g.cap == max(longest[h] for h in p) for g, p in zip(self.groups, parts)):
            return
        if len(self.groups) == 1:
            old_gid, old_loc = [0] * H, list(range(H))
        else:
            old_gid, old_loc = self.head_group.tolist(), self.head_local.tolist()
        new = []
        for heads in parts:
            cap = max(longest[h] for h in heads)
            d = {}
            for name, fill in _FILL.items():
                srcs = [getattr(self.groups[old_gid[h]], name) for h in heads]
                ref = next((x for x in srcs if x is not None), None)
                if ref is None:
                    d[name] = None
                    continue
                if len(heads) == H == self.groups[0].heads.numel():  # one group before and after: trim
                    d[name] = ref[:, :, :cap].clone() if ref.shape[2] > cap else ref
                    continue
                x = torch.full((self.batch, len(heads), cap, *ref.shape[3:]), fill, dtype=ref.dtype, device=ref.device)
                for j, h in enumerate(heads):
                    src = getattr(self.groups[old_gid[h]], name)
                    if src is not None:
                        x[:, j] = src[:, old_loc[h], :cap]
                d[name] = x
            new.append(HeadGroup(torch.tensor(heads, dtype=torch.long, device=self.device), d["k"], d["v"],
                                 d["positions"], d["log_weight"]))
        self.groups = new
        if len(new) == 1:
            self.head_group = self.head_local = None
            return
        gid, loc = [0] * H, [0] * H
        for gi, heads in enumerate(parts):
            for j, h in enumerate(heads):
                gid[h], loc[h] = gi, j
        self.head_group = torch.tensor(gid, dtype=torch.long, device=self.device)
        self.head_local = torch.tensor(loc, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ reads
    def gather(self, tok: Tensor, valid: Tensor, out=None):
        """Rows ``tok [B, Hkv, n]`` as ``(k, v) [B, Hkv, n, D]``, zeros where not ``valid`` or past a
        group's storage; written into ``out`` when given."""
        B, H, n = tok.shape
        dev = self.groups[0].k.device
        tok, valid = tok.to(dev), valid.to(dev)
        if out is None:
            out = tuple(torch.empty(B, H, n, self.head_dim, dtype=self.dtype, device=dev) for _ in range(2))
        for g, hs in self.parts():
            hs = torch.arange(H, device=dev) if hs is None else hs.to(dev)
            t = tok[:, hs]
            ok = valid[:, hs] & (t < g.cap)
            idx = torch.where(ok, t, torch.zeros_like(t))[..., None].expand(-1, -1, -1, self.head_dim)
            for src, dst in ((g.k, out[0]), (g.v, out[1])):
                rows = torch.gather(src, 2, idx) if g.cap else src.new_zeros(idx.shape)
                dst[:, hs] = rows.masked_fill(~ok[..., None], 0)
        return out

    def nbytes(self, meta: bool = True) -> int:
        """Bytes held: K/V, positions and log-weights per group; ``meta``: plus lengths and head maps."""
        ts = [t for g in self.groups for t in (g.k, g.v, g.positions, g.log_weight)]
        if meta:
            ts += [self.lengths, self.head_group, self.head_local]
            if len(self.groups) > 1:
                ts += [g.heads for g in self.groups]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # ------------------------------------------------------------------ attention
    def attend(self, q: Tensor, pattern: Optional[TokenPattern] = None, **kw):
        """Decode attention of ``q [B, Hq, D]`` (see ``sparsattn.kv.KVCache.attend``): per-row lengths and
        log-weights honoured; the kernel runs once per head group on its query heads (``sinks [Hq]``:
        each group gets its own query heads' sinks; ``softcap`` as in the kernel)."""
        if len(self.groups) == 1:
            return attend_one(self, q, pattern, kw)
        return attend_groups(self, q, pattern, kw)

    def attend_causal(self, q: Tensor, *, scale=None, backend=None, softcap=None,
                      sinks: Optional[Tensor] = None) -> Tensor:
        """Attention of ``q [B, Hq, Tq, D]`` whose Tq queries are the last Tq slots of every row (causal),
        honouring each row's length and log-weights: one query = ``attend`` (the sparse decode kernel),
        several = dense SDPA with an additive mask per group (float32 when the layer has log-weights).
        ``softcap`` / ``sinks [Hq]`` (Gemma 2 / gpt-oss, see ``sparsattn.kv.store_attend``): the kernel
        for one query, a float32 masked softmax per group (that group's query heads' sinks) for several."""
        B, Hq, Tq, D = q.shape
        H = self.kv_heads
        if Hq % H or B != self.batch:
            raise _err("q", f"[B={self.batch}, Hq (a multiple of {H}), Tq, D]", tuple(q.shape))
        extra = {}
        if softcap is not None:
            extra["softcap"] = softcap
        if sinks is not None:
            extra["sinks"] = check_sinks(sinks, Hq, q.device, values=False)  # values: checked downstream
        if Tq == 1:  # the decode kernel over each row's own length (dense fast path without weights)
            be = backend if backend in ("triton", "reference") else None
            return self.attend(q[:, :, 0], None, scale=scale, backend=be, **extra)[:, :, None]
        G = Hq // H
        dev = q.device
        dt = torch.float32 if any(g.log_weight is not None for g in self.groups) else q.dtype  # one dtype a layer
        out = torch.empty_like(q)
        for g, hs in self.parts():
            hs = torch.arange(H, device=dev) if hs is None else hs.to(dev)
            qi = group_query_heads(hs, G, dev)
            ex = dict(extra, sinks=sinks[qi]) if sinks is not None else extra
            out[:, qi] = attend_rows(q[:, qi], g.k, g.v, self.lengths[:, hs], g.log_weight, scale=scale,
                                     backend=backend, dense_dtype=dt, **ex)
        return out


__all__ = ["HeadGroupStore", "HeadGroup", "left_to_slots", "slots_to_left"]
