"""combiner: Combiner: full attention support at sub-quadratic cost by factorising attention into a
direct local part and summaries of every other region, with one softmax over both (Combiner: Full
Attention Transformer with Sparse Computation Cost, arXiv 2107.05768).

``combiner_attention(q, k, v, variant=...)`` is the core on ``[B, H, T, D]`` returning
``(out, lse)``. The sequence is cut into ``n`` segments (rows) of ``L`` tokens (default
``L = ceil(sqrt(T))``). Attention is the expectation ``sum_j p(j | i) v_j`` with
``p(j | i) = p(region | i) q(j | region)`` outside the query's own region, where the summary of a
region is one key and one value that do not depend on the attending query:

* ``"fixed"`` (Combiner-Fixed, the authors' ``sqrt_fixed_full``): direct = the query's own segment
  (causal: its prefix); every earlier segment (non-causal: every other segment) is one summary with
  key = max-pool of its keys and value = attention of its max-pooled query over its keys and values;
* ``"axial"`` (Combiner-Axial, the authors' ``axial_rowmajor`` with ``row_summary='none'``): direct =
  the query's own row (causal: its prefix); for every earlier row (non-causal: every other row) the
  entry in the query's column is a summary whose key is that entry's key and whose value is that
  entry's attention over its whole row. Every earlier token is reached through exactly one summary.

The direct scores and the summary scores share one softmax: computed as two ``(out, lse)`` parts
merged by ``sparsattn.kernels.merge.merge_lse``. Cost ``O(T (L + n) D)`` = ``O(T sqrt(T) D)``.
With ``segment >= T`` there is one segment: exact attention.

Differences from the authors' code (``google-research/combiner``, TensorFlow, read, not copied):
torch, causal and non-causal in one function; a sequence that is not a multiple of ``L`` is padded at
the end (padded keys are masked where a real query could see them); the Logsparse and Mixture
variants are not implemented.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...kernels.merge import merge_lse
from ..base import register_layer
from ..layers._qkv import QKVLayer, check_int
from ._approx_common import add_stat, cdiv, check_qkv, check_scale, pad_tokens, softmax_lse, wide_dtype

__all__ = ["combiner_attention", "Combiner", "VARIANTS"]

VARIANTS = ("axial", "fixed")


def combiner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str = "axial",
                       causal: bool = True, scale: Optional[float] = None, segment: Optional[int] = None,
                       stats: Optional[dict] = None):
    """combiner_attention: Combiner-Axial / Combiner-Fixed attention (arXiv 2107.05768).

    Args:
        q, k, v: ``[B, H, T, D]`` (self-attention).
        variant: "axial" or "fixed" (module docstring).
        segment: tokens per segment/row ``L`` (default ``ceil(sqrt(T))``).
        stats: optional dict; adds ``pairs``: query-key dot products computed (summaries included).
    Returns:
        ``(out [B, H, T, Dv] in q's dtype, lse [B, H, T])``: the lse of the joint softmax.
    """
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    B, H, T, D = q.shape
    L = math.isqrt(T - 1) + 1 if segment is None else check_int("segment", segment, 1)
    L = min(L, T)
    n = cdiv(T, L)
    Tp = n * L
    dt = wide_dtype(q)
    Dv = v.shape[-1]
    qs, ks, vs = (pad_tokens(t.to(dt), Tp).reshape(B, H, n, L, t.shape[-1]) for t in (q, k, v))
    real = (torch.arange(Tp, device=q.device) < T).reshape(n, L)  # padded keys are never attended
    li = torch.arange(L, device=q.device)
    # direct part: own segment (causal prefix)
    local_keep = real[:, None, :].expand(n, L, L)
    if causal:
        local_keep = local_keep & (li[None, :] <= li[:, None])
    s_loc = torch.matmul(qs, ks.transpose(-1, -2)) * scale  # [B, H, n, L, L]
    o_loc, l_loc = softmax_lse(s_loc, vs, local_keep)
    add_stat(stats, "pairs", B * H * n * L * L)
    if n == 1:
        return o_loc.reshape(B, H, Tp, Dv)[:, :, :T].to(q.dtype), l_loc.reshape(B, H, Tp)[:, :, :T]
    ni = torch.arange(n, device=q.device)
    other = (ni[None, :] < ni[:, None]) if causal else (ni[None, :] != ni[:, None])  # [query seg, summary seg]
    if variant == "fixed":
        neg = torch.finfo(dt).min
        k_max = ks.masked_fill(~real[..., None], neg).amax(3)  # [B, H, n, D] summary keys
        q_max = qs.masked_fill(~real[..., None], neg).amax(3)
        s_sum = torch.matmul(q_max[..., None, :], ks.transpose(-1, -2)) * scale  # [B, H, n, 1, L]
        v_sum, _ = softmax_lse(s_sum, vs, real[:, None, :])
        v_sum = v_sum[..., 0, :]  # [B, H, n, Dv]
        s_g = torch.matmul(qs.reshape(B, H, Tp, -1), k_max.transpose(-1, -2)) * scale  # [B, H, Tp, n]
        keep = other.repeat_interleave(L, 0)  # [Tp, n]
        o_g, l_g = softmax_lse(s_g, v_sum, keep)
        add_stat(stats, "pairs", B * H * (n * L + Tp * n))
        o_g, l_g = o_g.reshape(B, H, n, L, Dv), l_g.reshape(B, H, n, L)
    else:
        # each entry's attention over its whole row (a summary of that row, seen from its column)
        o_row, _ = softmax_lse(s_loc, vs, real[:, None, :].expand(n, L, L))
        qc, kc = qs.transpose(2, 3), ks.transpose(2, 3)  # [B, H, L, n, D]: columns
        s_g = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, H, L, n, n]
        keep = other[None] & real.T[:, None, :]  # [L, query row, summary row]
        o_g, l_g = softmax_lse(s_g, o_row.transpose(2, 3), keep)
        add_stat(stats, "pairs", B * H * L * n * n)
        o_g, l_g = o_g.transpose(2, 3), l_g.transpose(2, 3)
    out, lse = merge_lse([(o_loc, l_loc), (o_g, l_g)])
    return out.reshape(B, H, Tp, Dv)[:, :, :T].to(q.dtype), lse.reshape(B, H, Tp)[:, :, :T]


@register_layer("combiner")
class Combiner(QKVLayer):
    """Combiner: direct local attention + region summaries in one softmax (Combiner: Full Attention
    Transformer with Sparse Computation Cost, arXiv 2107.05768).

    ``x [B, T, dim] -> [B, T, dim]``; ``variant`` "axial" (Combiner-Axial, default) or "fixed"
    (Combiner-Fixed); ``segment`` tokens per row/segment (None: ``ceil(sqrt(T))``, the paper's
    choice). Every output depends on every earlier token (full support) at ``O(T sqrt(T))`` cost.
    """

    paper = "Combiner: Full Attention Transformer with Sparse Computation Cost (arXiv 2107.05768)"
    kind = "approx"
    content_based = False
    presets = {"default": {}, "fixed": {"variant": "fixed"}}

    def __init__(self, dim: int, heads: int, causal: bool = True, variant: str = "axial",
                 segment: Optional[int] = None, bias: bool = False):
        super().__init__()
        self._init_qkv(dim, heads, causal, bias)
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        if segment is not None:
            check_int("segment", segment, 1)
        self.variant, self.segment = variant, segment
        self.last_stats: dict = {}

    def attend(self, q, k, v):
        """``(out, lse)`` of Combiner on q/k/v ``[B, heads, T, head_dim]``."""
        self.last_stats = {}
        return combiner_attention(q, k, v, variant=self.variant, causal=self.causal, segment=self.segment,
                                  stats=self.last_stats)

    def cost(self, T: int) -> dict:
        """``{"density", "flops"}`` of one forward over ``T`` tokens (pairs counted as computed)."""
        check_int("T", T, 1)
        L = min(math.isqrt(T - 1) + 1 if self.segment is None else self.segment, T)
        n = cdiv(T, L)
        pairs = n * L * L
        if n > 1:
            pairs += (n * L + n * L * n) if self.variant == "fixed" else L * n * n
        full = T * (T + 1) / 2 if self.causal else float(T * T)
        return {"density": pairs / full, "flops": 4.0 * pairs * self.dim}
