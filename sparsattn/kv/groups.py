"""groups: KV head groups, the one rule that splits a layer's KV heads by their row lengths.

After per-head eviction the rows of different KV heads can have very different lengths
(RazorAttention's retrieval heads keep everything, MoA's spans differ per head). Both
``sparsattn.kv.KVCache`` (``shrink``) and ``sparsattn.integrations.hf.SparseCache`` (after a policy
ran) then store each group of similar lengths as its own tensor, so memory follows the per-head
lengths; both decide the groups with ``head_groups``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.sparse_decode import sparse_decode_attention
from ..patterns import TokenPattern

Tensor = torch.Tensor

__all__ = ["head_groups", "materialise", "group_query_heads", "GroupedLayerMixin"]


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def head_groups(longest, waste: float) -> list:
    """head_groups: partition KV heads by their longest row into groups of similar length.

    ``longest``: per-head slot counts (e.g. the longest row over the batch). Heads are taken longest
    first (ties by head id); a head joins the current group unless the group's padding (its capacity,
    the first head's length, times its heads, minus their lengths) would exceed ``waste`` of the
    group's storage. Returns lists of head ids (each ascending), ordered by their first head id.
    """
    order = sorted(range(len(longest)), key=lambda h: (-int(longest[h]), h))
    parts, cur, cap, tot = [], [], 0, 0
    for h in order:
        n = int(longest[h])
        if cur:
            alloc = cap * (len(cur) + 1)
            if alloc and (alloc - tot - n) / alloc > waste:
                parts.append(cur)
                cur = []
        if not cur:
            cap, tot = n, 0
        cur.append(h)
        tot += n
    if cur:
        parts.append(cur)
    return sorted((sorted(p) for p in parts), key=lambda p: p[0])


def materialise(parts, B: int, H: int, T: int, fill, *, left: bool):
    """materialise: one padded ``[B, H, T, ...]`` tensor from per-group tensors ``[B, H_g, cap_g, ...]``.

    ``parts``: ``[(kv head ids [H_g], tensor or None), ...]``; rows are placed at the end of the
    ``T`` slots (``left=True``: left-padded rows, SparseCache's layout) or at the start (``left=False``:
    slot-major rows, KVCache's layout), ``fill`` elsewhere. None when no group has the tensor. A new
    tensor, not a view of the groups' storage.
    """
    ref = next((x for _, x in parts if x is not None), None)
    if ref is None:
        return None
    out = torch.full((B, H, T, *ref.shape[3:]), fill, dtype=ref.dtype, device=ref.device)
    for hs, x in parts:
        if x is not None:
            cap = x.shape[2]
            if left:
                out[:, hs.to(out.device), T - cap:] = x
            else:
                out[:, hs.to(out.device), :cap] = x
    return out


def group_query_heads(heads: Tensor, G: int, device) -> Tensor:
    """group_query_heads: query-head ids ``[H_g * G]`` of KV heads ``heads`` (GQA: query head ``h * G + i``
    reads KV head ``h``), the heads a group's attention runs on."""
    return (heads.to(device)[:, None] * G + torch.arange(G, device=device)).reshape(-1)


@dataclass
class _Group:
    """One head group of a grouped contiguous layer: kv heads ``heads`` (ascending) stored together."""

    heads: Tensor  # [H_g] int64
    k: Tensor  # [B, H_g, cap_g, D]
    v: Tensor
    positions: Tensor  # [B, H_g, cap_g] int64
    log_weight: Optional[Tensor] = None  # [B, H_g, cap_g] float32 or None


class GroupedLayerMixin:
    """GroupedLayerMixin: ``KVCache``'s operations on a layer stored as head groups (``shrink`` forms the
    groups; gather and decode attention run group by group)."""

    def _gather_groups(self, L, tok: Tensor, valid: Tensor, out=None):
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

    def _attend_groups(self, L, q: Tensor, pattern: Optional[TokenPattern], kw: dict):
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
        for g in L.groups:
            hs = g.heads.to(dev)
            qi = group_query_heads(hs, G, dev)
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
