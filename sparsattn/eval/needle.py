"""Needle coverage: whether a sparse pattern keeps the needle in the heads that read it under dense
attention (a retrieval-aware fidelity metric for long-context prefill; the heads are found as in
Retrieval Head Mechanistically Explains Long-Context Factuality, arXiv 2404.15574, by attention mass
instead of the top-1 copy rule).

A head *reads the needle* when, under dense causal attention, the mean attention mass that the
reading rows (the question and answer positions of a passkey prompt) put on the needle tokens (the
passkey value's token positions) is at least ``threshold``. For each such head, the *kept fraction*
is the share of that dense needle mass that falls inside the head's sparse pattern on the same
rows; a head *keeps the needle* when its kept fraction is at least ``keep``. The coverage of a
pattern is (reading heads that keep the needle) / (reading heads): 1.0 means every head that reads
the needle can still read it through the sparse pattern; a method can reach a low attention recall
over all rows and still full coverage, or the reverse.

Everything here is plain torch on captured q/k (``sparsattn.capture.capture_qkv``) and the patterns
a method returns for them; nothing runs the model.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch

Tensor = torch.Tensor

__all__ = ["needle_mass", "pattern_rows_mask", "needle_coverage"]


def _index(name: str, x, limit: int) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.long).flatten()
    if t.numel() == 0:
        raise ValueError(f"{name}: expected at least one position, got none")
    if int(t.min()) < 0 or int(t.max()) >= limit:
        raise ValueError(f"{name}: expected positions in [0, {limit}), got [{int(t.min())}, {int(t.max())}]")
    return torch.unique(t)


def _check_qk(q: Tensor, k: Tensor) -> None:
    if not (isinstance(q, Tensor) and isinstance(k, Tensor)) or q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q/k: expected 4-D tensors [batch, heads, tokens, head_dim], got "
                         f"{getattr(q, 'shape', type(q))}, {getattr(k, 'shape', type(k))}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"k: expected batch/head_dim of q and kv heads dividing {q.shape[1]}, got {tuple(k.shape)}")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"k tokens: expected >= q tokens ({q.shape[2]}), got {k.shape[2]}")


def _dense_rows(q: Tensor, k: Tensor, rows: Tensor, scale: Optional[float]) -> Tensor:
    """Dense causal attention probabilities float32 ``[B, Hq, len(rows), Tk]`` of query ``rows``."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qr = q[:, :, rows].float().view(B, Hkv, G, len(rows), D)
    s = torch.matmul(qr, k.float()[:, :, None].transpose(-1, -2)).reshape(B, Hq, len(rows), Tk) * scale
    pos = rows.to(q.device) + (Tk - Tq)
    s = s.masked_fill(torch.arange(Tk, device=q.device)[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(s, -1)


def needle_mass(q: Tensor, k: Tensor, rows, needle, *, scale: Optional[float] = None) -> Tensor:
    """needle_mass: per query head, the dense causal attention mass that query ``rows`` put on the key
    positions ``needle``, averaged over the rows and the batch -> float64 ``[Hq]`` in [0, 1].

    Args:
        q: ``[B, Hq, Tq, D]`` queries (post-RoPE), k: ``[B, Hkv, Tk, D]`` keys (GQA: Hkv divides Hq).
        rows: query row indices (``0 <= r < Tq``), e.g. the question and answer positions.
        needle: key positions of the needle (``0 <= j < Tk``), e.g. the passkey value's tokens.
        scale: softmax scale (default ``1/sqrt(D)``).
    Raises:
        ValueError: bad shapes, empty or out-of-range rows / needle positions.
    """
    _check_qk(q, k)
    r = _index("rows", rows, q.shape[2])
    nd = _index("needle", needle, k.shape[2])
    p = _dense_rows(q, k, r, scale)
    return p[..., nd.to(p.device)].sum(-1).double().mean((0, 2)).cpu()


def pattern_rows_mask(pattern, rows: Tensor, n_heads: int, b: int = 0) -> Tensor:
    """pattern_rows_mask: bool ``[n_heads, len(rows), kv_len]`` element mask of ``pattern`` (a
    ``BlockPattern``) at query ``rows`` of batch ``b``; a pattern with one head (or kv heads) is
    broadcast to the ``n_heads`` query heads."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    bq = pattern.block_q
    pb = b if pattern.batch > 1 else 0
    blocks = torch.unique(rows // bq)
    parts, where = [], {}
    for i, qb in enumerate(blocks.tolist()):
        parts.append(pattern.mask_rows(pb, qb, qb + 1))
        where[qb] = i
    out = torch.stack([parts[where[int(r) // bq]][:, int(r) % bq] for r in rows], 1)  # [Hp, rows, Tk]
    Hp = out.shape[0]
    if Hp != n_heads:
        if Hp == 1 or n_heads % Hp:
            if Hp != 1:
                raise ValueError(f"pattern: {Hp} heads do not divide the {n_heads} query heads")
            out = out.expand(n_heads, -1, -1)
        else:
            out = out.repeat_interleave(n_heads // Hp, 0)
    return out


def needle_coverage(layers: Mapping[int, Sequence[Tensor]], patterns: Mapping[int, object], rows, needle, *,
                    scales: Optional[Mapping[int, float]] = None, threshold: float = 0.1,
                    keep: float = 0.5) -> dict:
    """needle_coverage: the fraction of the heads that read the needle under dense attention whose
    sparse pattern keeps it.

    Args:
        layers: ``{layer: (q, k, ...)}`` captured q/k (post-RoPE) of one prompt, q ``[B, Hq, T, D]``.
        patterns: ``{layer: BlockPattern}`` a method selected on the same q/k (layers missing here
            count as dense: every reading head there keeps the needle).
        rows: the reading rows (question + answer positions).
        needle: the needle's key positions (the passkey value's tokens).
        scales: per-layer softmax scale (default ``1/sqrt(D)``).
        threshold: a head reads the needle when its dense needle mass (``needle_mass``) >= this.
        keep: a reading head keeps the needle when the pattern keeps >= this share of its dense
            needle mass on the reading rows.
    Returns:
        ``{"coverage": kept / reading (nan when no head reads the needle), "n_reading", "n_kept",
        "mean_kept_fraction" (over reading heads; nan if none), "heads": [{"layer", "head", "mass",
        "kept_fraction", "kept"} per reading head]}``.
    Raises:
        ValueError: bad thresholds, shapes or positions; a pattern whose lengths differ from q/k.
    """
    for name, v in (("threshold", threshold), ("keep", keep)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(f"{name}: expected a number in (0, 1], got {v!r}")
    if not layers:
        raise ValueError("layers: expected at least one captured layer")
    heads = []
    for layer in sorted(layers, key=int):
        q, k = layers[layer][0], layers[layer][1]
        _check_qk(q, k)
        r = _index("rows", rows, q.shape[2])
        nd = _index("needle", needle, k.shape[2])
        sc = None if scales is None else scales.get(layer)
        p = _dense_rows(q, k, r, sc)[..., nd.to(q.device)]  # [B, Hq, R, n]
        mass = p.sum(-1).double().mean((0, 2))  # [Hq]
        reading = (mass >= threshold).nonzero().flatten().tolist()
        if not reading:
            continue
        pat = patterns.get(layer) if patterns is not None else None
        kept_mass = None
        if pat is not None:
            if pat.q_len != q.shape[2] or pat.kv_len != k.shape[2]:
                raise ValueError(f"patterns[{layer}]: expected q_len {q.shape[2]} / kv_len {k.shape[2]}, got "
                                 f"{pat.q_len} / {pat.kv_len}")
            kept_mass = torch.zeros(q.shape[1], dtype=torch.float64)
            for b in range(q.shape[0]):
                m = pattern_rows_mask(pat, r, q.shape[1], b)[..., nd.to(pat.device)].to(p.device)  # [Hq, R, n]
                kept_mass += (p[b] * m).sum((-1, -2)).double().cpu()
            kept_mass /= q.shape[0] * len(r)
        for h in reading:
            mh = float(mass[h])
            frac = 1.0 if kept_mass is None else min(1.0, float(kept_mass[h]) / mh)
            heads.append({"layer": int(layer), "head": int(h), "mass": round(mh, 4),
                          "kept_fraction": round(frac, 4), "kept": bool(frac >= keep)})
    n = len(heads)
    n_kept = sum(h["kept"] for h in heads)
    return {"coverage": n_kept / n if n else float("nan"), "n_reading": n, "n_kept": n_kept,
            "mean_kept_fraction": sum(h["kept_fraction"] for h in heads) / n if n else float("nan"),
            "heads": heads}
