"""prefill_capture: q/k/v of every layer captured on one prompt, and what the prefill driver measures on
them: the exact density of a method's patterns (``measure_density``) and its fidelity to dense attention
on every layer (``fidelity_layers``: attention recall, MInference arXiv 2407.02490; top-10 recall, Quest
arXiv 2406.10774; relative output error), methods selecting layer by layer in order as in a forward."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

__all__ = ["Captured", "capture_prompt", "select_context", "select_all", "measure_density", "fidelity_layers"]


@dataclass
class Captured:
    """Captured: q/k/v (after RoPE) and pre-RoPE q/k of every attention layer for one prompt, plus softmax scales."""
    layers: dict      # layer -> (q, k, v, q_pre, k_pre)
    scales: dict      # layer -> float
    n_tokens: int


def capture_prompt(model, ids: torch.Tensor) -> Captured:
    """capture_prompt: ``Captured`` for ``ids [1, T]`` (``sparsattn.capture.capture_qkv`` + q_proj/k_proj hooks
    for the pre-RoPE tensors SeerAttention's gate reads)."""
    from ..capture import capture_qkv
    from ..integrations.hf import attention_modules

    mods = attention_modules(model)
    pre: dict = {l: {} for l in mods}
    hs = []
    for l, m in mods.items():
        hd = m.head_dim

        def hook(which, l=l, hd=hd):
            def fn(mod, args, out):
                B, T = out.shape[0], out.shape[1]
                pre[l][which] = out.detach().view(B, T, -1, hd).transpose(1, 2)
            return fn
        hs += [m.q_proj.register_forward_hook(hook("q")), m.k_proj.register_forward_hook(hook("k"))]
    try:
        cap = capture_qkv(model, ids)
    finally:
        for h in hs:
            h.remove()
    layers = {l: (*cap[l], pre[l].get("q"), pre[l].get("k")) for l in sorted(cap)}
    scales = {l: float(getattr(mods[l], "scaling", cap[l][0].shape[-1] ** -0.5)) for l in cap}
    return Captured(layers, scales, int(ids.shape[1]))


def select_context(method, layer: int, q, k, v, qp, kp, scale: float, state: dict):
    """select_context: the SelectContext the HF integration builds at prefill for ``layer`` (pre-RoPE q/k
    only for methods with ``needs_pre_rope``; ``state`` shared by the layers of one forward)."""
    from ..methods.base import SelectContext

    pre = getattr(method, "needs_pre_rope", False)
    return SelectContext(layer=layer, causal=True, scale=scale, q_offset=0, state=state, phase="prefill",
                         padding_side="right", num_kv_groups=q.shape[1] // k.shape[1], v=v,
                         q_pre_rope=qp if pre else None, k_pre_rope=kp if pre else None)


def select_all(method, cap: Captured) -> dict:
    """select_all: ``{layer: pattern}`` of ``method`` on every captured layer, in order, with one shared state."""
    state: dict = {}
    out = {}
    for l, (q, k, v, qp, kp) in cap.layers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[l] = method.select(q, k, select_context(method, l, q, k, v, qp, kp, cap.scales[l], state))
    return out


def measure_density(method, cap: Captured) -> tuple[float, list[float]]:
    """measure_density: (mean over layers, per layer) of the exact pattern density of ``method`` on ``cap``."""
    pats = select_all(method, cap)
    per = [float(p.density) for p in pats.values()]
    return sum(per) / len(per), per


def _rows(p):
    """Row provider for attention_fidelity: rows [q0, q1) of pattern ``p`` (batch 0), never T x T at once."""
    bq = p.block_q

    def rows(q0: int, q1: int) -> torch.Tensor:
        qb0, qb1 = q0 // bq, -(-q1 // bq)
        m = p.mask_rows(0, qb0, qb1)
        return m[:, q0 - qb0 * bq: q1 - qb0 * bq][None]
    return rows


def fidelity_layers(method, cap: Captured, *, topk: int = 10) -> list[dict]:
    """fidelity_layers: one dict per layer (recall, topk_recall, rel_error, n_large_error, density, err_sq, ref_sq)
    of ``method``'s patterns against dense attention on ``cap`` (all query rows); ``method=None`` = dense."""
    from .fidelity import attention_fidelity

    out = []
    pats = select_all(method, cap) if method is not None else None
    for l, (q, k, v, _, _) in cap.layers.items():
        if pats is None:
            out.append({"layer": l, "recall": 1.0, "topk_recall": 1.0, "rel_error": 0.0, "n_large_error": 0,
                        "density": 1.0, "err_sq": 0.0, "ref_sq": 1.0})
            continue
        r = attention_fidelity(q.float(), k.float(), v.float(), _rows(pats[l]), causal=True, scale=cap.scales[l],
                               topk=topk)
        out.append({"layer": l, "recall": float(r.recall.mean()), "topk_recall": float(r.topk_recall.mean()),
                    "rel_error": math.sqrt(float(r.err_sq.sum()) / max(float(r.ref_sq.sum()), 1e-30)),
                    "n_large_error": int(r.n_large_error.sum()), "density": float(r.density.mean()),
                    "err_sq": float(r.err_sq.sum()), "ref_sq": float(r.ref_sq.sum())})
    return out


def _pool(layer_rows: list[dict]) -> dict:
    n = len(layer_rows)
    err = sum(r["err_sq"] for r in layer_rows)
    ref = sum(r["ref_sq"] for r in layer_rows)
    return {"recall": sum(r["recall"] for r in layer_rows) / n,
            "topk_recall": sum(r["topk_recall"] for r in layer_rows) / n,
            "rel_error": math.sqrt(err / ref) if ref > 0 else 0.0,
            "density": sum(r["density"] for r in layer_rows) / n,
            "min_layer_recall": min(r["recall"] for r in layer_rows)}
