"""SeerAttention's gate block recall against the oracle: how many of the key blocks with the largest
exact block-max attention the AttnGate ranks in its own top k (SeerAttention: Learning Intrinsic
Sparse Attention in Your LLMs, arXiv 2410.13276; the gate is distilled from exactly that block-max
attention, so this is the distillation's ranking quality where it matters).

Re-exported by ``sparsattn.calibrate.seer_attention`` (the method's calibration module): its
``diagnostics(method, layers, scales)`` is the per-method diagnostic that the prefill quality driver
calls on its captured passkey prompts (``sparsattn.eval.prefill_needle``), without naming the method.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["gate_block_recall", "diagnostics"]


def _context(seer, layer: int, q, k, v, qp, kp, scale: float, state: dict):
    """The SelectContext of a prefill call at ``layer`` (pre-RoPE q/k when the gate reads them)."""
    from ..methods.base import SelectContext

    pre = getattr(seer, "needs_pre_rope", False)
    return SelectContext(layer=layer, causal=True, scale=scale, q_offset=0, state=state, phase="prefill",
                         padding_side="right", num_kv_groups=q.shape[1] // k.shape[1], v=v,
                         q_pre_rope=qp if pre else None, k_pre_rope=kp if pre else None)


def gate_block_recall(seer, layers: dict, scales: dict, k_per_row: int) -> list[float]:
    """gate_block_recall: per layer, the share of the oracle's top-``k_per_row`` key blocks (exact
    block-max attention, diagonal excluded, causal rows with more than ``k_per_row`` candidates)
    that SeerAttention's gate ranks in its own top ``k_per_row``.

    Args:
        seer: a fitted ``SeerAttention`` instance (its ``block_logits`` and gate block size).
        layers: ``{layer: (q, k, v, q_pre_rope, k_pre_rope)}`` captured on one prompt (q/k post-RoPE).
        scales: ``{layer: softmax scale}``.
        k_per_row: blocks per query-block row compared (>= 1).
    Returns:
        one float in [0, 1] per layer, in the order of ``layers``.
    """
    from ..kernels import estimate

    if isinstance(k_per_row, bool) or not isinstance(k_per_row, int) or k_per_row < 1:
        raise ValueError(f"k_per_row: expected an int >= 1, got {k_per_row!r}")
    blk = int(seer.gate.block_size) if getattr(seer, "gate", None) is not None else 64
    out = []
    state: dict = {}
    for l, (q, k, v, qp, kp) in layers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = seer.block_logits(q, k, _context(seer, l, q, k, v, qp, kp, scales[l], state))
        s = estimate.exact_block_scores(q, k, blk, blk, scale=scales[l], causal=True, reduce="max").float()
        nq, nk = s.shape[-2:]
        cand = torch.ones(nq, nk, dtype=torch.bool).tril() & ~torch.eye(nq, nk, dtype=torch.bool)
        rows = cand.sum(-1) > k_per_row
        if not bool(rows.any()):
            out.append(float("nan"))
            continue
        g = g.float().masked_fill(~cand.to(g.device), float("-inf"))[..., rows.to(g.device), :]
        s = s.masked_fill(~cand.to(s.device), float("-inf"))[..., rows.to(s.device), :]
        gi = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(k_per_row, -1).indices, True)
        oi = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k_per_row, -1).indices, True)
        out.append(float((gi.cpu() & oi.cpu()).sum()) / max(1, float(oi.sum())))
    return out


def diagnostics(method, layers: dict, scales: dict) -> dict:
    """diagnostics: ``{"gate_block_recall": [per layer]}`` of a SeerAttention instance in top-k mode on
    captured layers (k = the blocks per row its ``nz_ratio`` gives at this length, ``nz_topk``);
    ``{}`` in threshold mode (no fixed k per row) or for an unfitted gate."""
    from ..methods.seer_attention import nz_topk

    if getattr(method, "nz_ratio", None) is None or not getattr(method, "is_fitted", False):
        return {}
    blk = int(method.gate.block_size)
    T = next(iter(layers.values()))[1].shape[2]
    return {"gate_block_recall": gate_block_recall(method, layers, scales, nz_topk(method.nz_ratio, -(-T // blk)))}
