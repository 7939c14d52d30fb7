"""recorder: the one pattern recorder of the evaluation drivers (a ``SelectHook`` on a method instance).

``SelectRecorder`` wraps a method instance's ``select`` while active (the class is untouched) and

* counts every call by phase (``calls``);
* with ``densities=True`` keeps every returned pattern's own density (``densities``, one value per
  call: the prefill driver's measured density of a forward; also per phase in ``phase_densities``,
  read with ``mean_density(phase=...)``);
* while ``active``, accumulates the top-k recall of decode selections and the fraction of the cache
  they read, per layer, on the device (``summary``: one host sync);
* with ``reuse_static=True`` reuses the pattern of an earlier call with the same
  ``method.static_pattern_key(layer)`` (not None), q/k shapes and device: the method declares that
  its pattern depends only on (layer, lengths), so it is not built again (A-shape, a calibrated plan).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..integrations.hf.heads import _to_bh  # pattern rows (batch 1|B, heads 1|Hkv|Hq) -> [B, Hq, ...]
from ..methods.base import SelectHook
from .recall import TOP_K_RECALL, topk_recall

__all__ = ["SelectRecorder"]


class SelectRecorder(SelectHook):
    """SelectRecorder: records a method instance's selections (see the module docstring).

    Args:
        method: the method instance (its ``select`` is wrapped inside ``with``).
        top: the k of the top-k recall (decode selections).
        densities: keep ``float(pattern.density)`` of every pattern in ``densities``.
        reuse_static: reuse patterns under the method's ``static_pattern_key``.
    """

    def __init__(self, method, top: int = TOP_K_RECALL, *, densities: bool = False, reuse_static: bool = False):
        super().__init__(method)
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            raise ValueError(f"top: expected an int >= 1, got {top!r}")
        self.top = top
        self.active = False
        self.record_densities = bool(densities)
        self.reuse_static = bool(reuse_static)
        self.calls: dict[str, int] = {}
        self.active_calls = 0
        self.densities: list[float] = []
        self.phase_densities: dict[str, list[float]] = {}
        self.reused = 0
        self._cache: dict = {}
        self._acc: dict[int, torch.Tensor] = {}  # layer -> [sum recall, sum density, n, sum recall sparse, n sparse]

    def _static_key(self, q, k, ctx):
        if not self.reuse_static:
            return None
        keyf = getattr(self.method, "static_pattern_key", None)
        sk = keyf(getattr(ctx, "layer", None)) if keyf is not None else None
        return None if sk is None else (sk, tuple(q.shape[:3]), tuple(k.shape[:3]), q.device)

    def on_select(self, orig, q, k, ctx=None, *a, **kw):
        key = self._static_key(q, k, ctx)
        if key is not None and key in self._cache:
            p, d = self._cache[key]
            self.reused += 1
        else:
            p = orig(q, k, ctx, *a, **kw)
            d = float(p.density) if self.record_densities and p is not None else None
            if key is not None:
                self._cache[key] = (p, d)
        phase = (getattr(ctx, "phase", None) if ctx is not None else None) or "none"
        self.calls[phase] = self.calls.get(phase, 0) + 1
        if d is not None:
            self.densities.append(d)
            self.phase_densities.setdefault(phase, []).append(d)
        if self.active:
            self._record(q, k, p, ctx)
        return p

    def _record(self, q, k, p, ctx) -> None:
        from ..patterns import TokenPattern

        if not isinstance(p, TokenPattern):
            return
        self.active_calls += 1
        kl = None if ctx is None else ctx.kv_lens
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

    def mean_density(self, default: float = float("nan"), *, phase: Optional[str] = None) -> float:
        """mean_density: the mean of ``densities`` (of one ``phase``'s calls when given: "prefill",
        "decode"; ``default`` when none was recorded)."""
        ds = self.densities if phase is None else self.phase_densities.get(phase, [])
        return sum(ds) / len(ds) if ds else default

    def summary(self) -> dict:
        """``{"top10_recall", "top10_recall_sparse", "density", "calls", "layers": {layer: {...}}}`` of the
        active calls (None values when nothing was recorded)."""
        if not self._acc:
            return {"top10_recall": None, "top10_recall_sparse": None, "density": None, "calls": 0, "layers": {}}
        layers = sorted(self._acc)
        tab = torch.stack([self._acc[l] for l in layers]).double().cpu()
        tot = tab.sum(0)
        for v in tab.flatten().tolist():
            if not math.isfinite(v):
                raise RuntimeError("decode_quality: a non-finite recall/density was recorded")
        return {"top10_recall": float(tot[0] / tot[2]), "density": float(tot[1] / tot[2]), "calls": int(tot[2]),
                "top10_recall_sparse": float(tot[3] / tot[4]) if tot[4] > 0 else None,
                "layers": {l: {"top10_recall": float(r[0] / r[2]), "density": float(r[1] / r[2]), "calls": int(r[2])}
                           for l, r in zip(layers, tab)}}
