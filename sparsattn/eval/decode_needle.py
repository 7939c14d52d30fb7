"""decode_needle: needle coverage of a decode method's selections (which cached positions it kept) at
the decode steps that produce a passkey's answer (the retrieval-aware metric of
``sparsattn.eval.needle`` for the decode phase; heads found by attention mass as in Retrieval Head
Mechanistically Explains Long-Context Factuality, arXiv 2404.15574).

At each *answer step* (the last question token, whose output is the first answer token, and the
generated steps up to the answer's length), every ``select`` call (one per layer) gives the query
``q [B, Hq, 1, D]``, the cache ``k [B, Hkv, Tk, D]`` the method was given and its selection (a
``TokenPattern``: the cached positions it reads). Per query head, the dense attention of ``q`` over
the valid cache puts some mass on the needle's key positions (the passkey value's tokens in the
densely prefilled prefix); the selection keeps the part of that mass on the positions it selected.
Averaged over the answer steps, a head *reads the needle* when its mean dense mass is at least
``threshold`` and *keeps it* when the selection keeps at least ``keep`` of that mass: the same
definitions as the prefill driver's (``needle_coverage``), on the queries of the decode run itself.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..integrations.hf.heads import _to_bh  # selection rows (batch 1|B, heads 1|Hkv|Hq) -> [B, Hq, Tk]
from ..methods.base import SelectHook

__all__ = ["NeedleRecorder", "needle_keys"]


def needle_keys(tokenizer, ids: Sequence[int], n_prefill: int, value: str) -> Optional[tuple[list, int]]:
    """needle_keys: ``(positions, n_answer)``: the cache positions of the passkey ``value``'s tokens in the
    prefilled prefix ``ids[:n_prefill]`` (the last occurrence of the tokens of ``" " + value`` that are
    not blank) and the number of answer tokens (``" " + value``); None when they do not occur there."""
    from .prefill_needle import needle_positions
    from .tasks import encode_ids

    if not isinstance(value, str) or not value:
        raise ValueError(f"value: expected the passkey value as a non-empty string, got {value!r}")
    ans = encode_ids(tokenizer, " " + value, add_special_tokens=False)
    found = needle_positions(tokenizer, list(ids)[:n_prefill], ans)
    return None if found is None else (found[0], len(ans))


class NeedleRecorder(SelectHook):
    """NeedleRecorder: per layer and query head, the dense needle mass and the part the selection kept,
    summed over the ``select`` calls made while ``active`` (see the module docstring).

    Args:
        method: the decode method instance (its ``select`` is wrapped inside ``with``).
        needle: the needle's cache positions.
        threshold, keep: as in ``sparsattn.eval.needle.needle_coverage``.
    """

    def __init__(self, method, needle: Sequence[int], *, threshold: float = 0.1, keep: float = 0.5):
        super().__init__(method)
        for name, v in (("threshold", threshold), ("keep", keep)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name}: expected a number in (0, 1], got {v!r}")
        nd = torch.as_tensor(list(needle), dtype=torch.long).flatten()
        if nd.numel() == 0 or int(nd.min()) < 0:
            raise ValueError(f"needle: expected non-negative cache positions, got {list(needle)}")
        self.needle, self.threshold, self.keep = torch.unique(nd), float(threshold), float(keep)
        self.active = False
        self._acc: dict[int, torch.Tensor] = {}  # layer -> [2, Hq]: sum of dense mass, sum of kept mass
        self._n: dict[int, int] = {}

    def on_select(self, orig, q, k, ctx=None, *a, **kw):
        p = orig(q, k, ctx, *a, **kw)
        if self.active:
            self._record(q, k, p, ctx)
        return p

    def _record(self, q, k, p, ctx) -> None:
        from ..patterns import TokenPattern

        if not isinstance(p, TokenPattern):
            return
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        if int(self.needle.max()) >= Tk:
            raise ValueError(f"needle: position {int(self.needle.max())} is beyond the {Tk} cached tokens")
        scale = (ctx.scale if ctx is not None and ctx.scale is not None else 1.0 / math.sqrt(D))
        G = Hq // Hkv
        s = torch.matmul(q[:, :, -1:].float().view(B, Hkv, G, 1, D), k.float()[:, :, None].transpose(-1, -2))
        s = s.reshape(B, Hq, Tk) * scale
        kl = None if ctx is None else ctx.kv_lens
        if kl is not None:
            valid = torch.arange(Tk, device=k.device)[None, :] < torch.as_tensor(kl, device=k.device).long()[:, None]
            s = s.masked_fill(~valid[:, None, :], float("-inf"))
        prob = torch.softmax(s, -1)[..., self.needle.to(k.device)]  # [B, Hq, n]
        sel = _to_bh(p.to_token_mask(), B, Hq, "pattern")[..., self.needle.to(k.device)]
        row = torch.stack([prob.sum(-1).double().mean(0), (prob * sel).sum(-1).double().mean(0)]).cpu()
        layer = -1 if ctx is None or ctx.layer is None else int(ctx.layer)
        self._acc[layer] = row if layer not in self._acc else self._acc[layer] + row
        self._n[layer] = self._n.get(layer, 0) + 1

    def summary(self) -> dict:
        """``{"needle_reading", "needle_kept", "needle_kept_fraction" (mean over reading heads; None if
        none), "heads": [[layer, head, mass, kept_fraction, kept]]}`` of the active calls (mass averaged
        over them); ``needle_reading`` None when nothing was recorded."""
        if not self._acc:
            return {"needle_reading": None, "needle_kept": None, "needle_kept_fraction": None, "heads": []}
        heads = []
        for layer in sorted(self._acc):
            mass, kept = (self._acc[layer] / self._n[layer]).unbind(0)
            for h in (mass >= self.threshold).nonzero().flatten().tolist():
                frac = min(1.0, float(kept[h]) / float(mass[h]))
                heads.append([layer, h, round(float(mass[h]), 4), round(frac, 4), int(frac >= self.keep)])
        n = len(heads)
        return {"needle_reading": n, "needle_kept": sum(h[4] for h in heads),
                "needle_kept_fraction": sum(h[3] for h in heads) / n if n else None, "heads": heads}
