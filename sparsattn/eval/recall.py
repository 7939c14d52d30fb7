"""Top-k recall of a decode selection (the fraction of the keys with the largest exact q.k that a
method's selection keeps) and the ``SelectRecorder`` that measures it on every decode call."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..integrations.hf.heads import _to_bh  # pattern rows (batch 1|B, heads 1|Hkv|Hq) -> [B, Hq, ...]
from ..methods.base import SelectHook

#: how many of the true top keys the recall looks for
TOP_K_RECALL = 10


# ----------------------------------------------------------------------------------------------
# top-k recall of a selection
# ----------------------------------------------------------------------------------------------

def topk_recall(q: torch.Tensor, k: torch.Tensor, pattern, top: int = TOP_K_RECALL,
                kv_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """topk_recall: per (batch, query head), the fraction of the ``top`` keys with the largest exact
    ``q·k`` that the selection contains.

    Args:
        q: ``[B, Hq, D]`` or ``[B, Hq, 1, D]`` (one decode query per sequence).
        k: the cache ``[B, Hkv, T, D]`` (Hkv divides Hq; query head h reads KV head ``h // (Hq/Hkv)``).
        pattern: a ``TokenPattern`` (batch 1 or B; heads 1, Hkv or Hq; pages expanded to tokens) or a
            bool token mask ``[B|1, 1|Hkv|Hq, T]``.
        top: how many true top keys (``min(top, valid tokens)`` per row).
        kv_lens: optional ``[B]`` valid lengths (tokens ``[0, kv_lens[b])``, the decode methods'
            convention); default T.
    Returns:
        float32 ``[B, Hq]`` in [0, 1] (a row with no valid token gives 1: nothing to miss).
    """
    from ..patterns import TokenPattern

    if q.dim() == 4:
        if q.shape[2] != 1:
            raise ValueError(f"q: expected [B, Hq, D] or [B, Hq, 1, D], got {tuple(q.shape)}")
        q = q[:, :, 0]
    if q.dim() != 3 or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q/k: expected [B, Hq, D] and [B, Hkv, T, D] with Hkv dividing Hq, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top: expected an int >= 1, got {top!r}")
    B, Hq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if isinstance(pattern, TokenPattern):
        if pattern.kv_len != T:
            raise ValueError(f"pattern: kv_len {pattern.kv_len} != cache length {T}")
        sel = pattern.to_token_mask()
    elif isinstance(pattern, torch.Tensor) and pattern.dtype == torch.bool and pattern.dim() == 3 and pattern.shape[-1] == T:
        sel = pattern
    else:
        raise ValueError(f"pattern: expected a TokenPattern or a bool mask [B, H, {T}], got {type(pattern).__name__}")
    sel = _to_bh(sel.to(k.device), B, Hq, "pattern")
    G = Hq // Hkv
    s = torch.matmul(q.float().view(B, Hkv, G, D), k.float().transpose(-1, -2)).view(B, Hq, T)
    valid = torch.ones(B, T, dtype=torch.bool, device=k.device)
    if kv_lens is not None:
        kl = torch.as_tensor(kv_lens, device=k.device).long()
        if kl.shape != (B,):
            raise ValueError(f"kv_lens: expected [B={B}], got {tuple(kl.shape)}")
        valid = torch.arange(T, device=k.device)[None, :] < kl[:, None]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    kk = min(top, T)
    if kk == 0:
        return torch.ones(B, Hq, device=k.device)
    val, idx = s.topk(kk, dim=-1)
    ok = torch.isfinite(val)
    hit = torch.gather(sel, 2, idx) & ok
    n_ok = ok.sum(-1)
    return torch.where(n_ok > 0, hit.sum(-1).float() / n_ok.clamp(min=1).float(), torch.ones_like(n_ok, dtype=torch.float32))


class SelectRecorder(SelectHook):
    """SelectRecorder: wraps a method instance's ``select`` (restored on exit); counts every call by
    phase and, while ``active``, accumulates top-k recall and the fraction read per layer (on the
    device, one host sync at ``summary``)."""

    def __init__(self, method, top: int = TOP_K_RECALL):
        super().__init__(method)
        self.top = top
        self.active = False
        self.calls: dict[str, int] = {}
        self.active_calls = 0
        self._acc: dict[int, list] = {}  # layer -> [sum recall, sum density, n calls, sum recall sparse, n sparse]

    def on_select(self, orig, q, k, ctx=None, *a, **kw):
        p = orig(q, k, ctx, *a, **kw)
        phase = (ctx.extras.get("phase") if ctx is not None else None) or "none"
        self.calls[phase] = self.calls.get(phase, 0) + 1
        if self.active:
            self._record(q, k, p, ctx)
        return p

    def _record(self, q, k, p, ctx) -> None:
        from ..patterns import TokenPattern

        if not isinstance(p, TokenPattern):
            return
        self.active_calls += 1
        kl = None if ctx is None else ctx.extras.get("kv_lens")
        B, Hq = q.shape[0], q.shape[1]
        T = k.shape[2]
        rec = topk_recall(q, k, p, self.top, kl).mean()
        sel = _to_bh(p.to_token_mask(), B, Hq, "pattern")
        if kl is None:
            n_valid = torch.full((B,), T, device=k.device)
            valid = torch.ones(B, T, dtype=torch.bool, device=k.device)
        else:
            n_valid = torch.as_tensor(kl, device=k.device).long()
            valid = torch.arange(T, device=k.device)[None, :] < n_valid[:, None]
        got = (sel & valid[:, None, :]).sum(-1).float()  # [B, Hq]
        dens = (got / n_valid[:, None].clamp(min=1).float()).mean()
        sparse = (got < n_valid[:, None].float()).any().float()
        layer = -1 if ctx is None or ctx.layer is None else int(ctx.layer)
        acc = self._acc.get(layer)
        row = torch.stack([rec, dens, torch.ones_like(rec), rec * sparse, sparse])
        self._acc[layer] = row if acc is None else acc + row

    def summary(self) -> dict:
        """``{"top10_recall", "top10_recall_sparse", "density", "calls", "layers": {layer: {...}}}`` (None when
        nothing was recorded)."""
        if not self._acc:
            return {"top10_recall": None, "top10_recall_sparse": None, "density": None, "calls": 0, "layers": {}}
        layers = sorted(self._acc)
        tab = torch.stack([self._acc[l] for l in layers]).double().cpu()
        tot = tab.sum(0)
        for v in tab.flatten().tolist():
            if not math.isfinite(v):
                raise RuntimeError("decode_quality: a non-finite recall/density was recorded")
        out = {"top10_recall": float(tot[0] / tot[2]), "density": float(tot[1] / tot[2]), "calls": int(tot[2]),
               "top10_recall_sparse": float(tot[3] / tot[4]) if tot[4] > 0 else None,
               "layers": {l: {"top10_recall": float(r[0] / r[2]), "density": float(r[1] / r[2]), "calls": int(r[2])}
                          for l, r in zip(layers, tab)}}
        return out
