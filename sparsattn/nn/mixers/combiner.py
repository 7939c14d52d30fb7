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
  entry's attention over its whole row. Every earlier token is reached through exactly one summary;
* ``"axial_vertical"`` / ``"axial_horizontal"`` (the paper's ``omega_axial-vertical`` /
  ``omega_axial-horizontal``): direct = the sparse axial pattern (own row prefix + own column in the
  earlier rows); the rest through one summary per other column (the part of it in the earlier rows)
  / per earlier row (without the query's column);
* ``"mixture"`` (Combiner-Mixture): the paper's ``1/M sum_m A(x; omega_m)`` over the vertical and the
  horizontal plan, each normalised on its own, merged by lse with weight 1/2 each; returned lse =
  ``log`` of the mean of the two normalisers. These three live in ``_combiner_mixture.py``, whose
  docstring lists their differences from the paper and the authors' code.

In each variant (each component of the mixture) the direct scores and the summary scores share one
softmax: computed as ``(out, lse)`` parts merged by ``sparsattn.kernels.merge.merge_lse``. Cost
``O(T (L + n) D)`` = ``O(T sqrt(T) D)`` (``stats["pairs"]`` and ``Combiner.cost`` count the dot
products: ``combiner_pairs``; the pairs a variant attends to directly: ``combiner_direct_mask``).
With ``segment >= T`` there is one segment: exact attention (and for the axial_vertical /
axial_horizontal / mixture variants also with ``segment = 1``: one column).

Differences from the authors' code (``google-research/combiner``, TensorFlow, read, not copied):
torch, causal and non-causal in one function; a sequence that is not a multiple of ``L`` is padded at
the end (padded keys are masked where a real query could see them); Combiner-Logsparse and
Combiner-Learnable (routing) are not implemented (the authors' mixture is built from the two axial
plans, not from Logsparse).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...kernels.merge import merge_lse
from ..base import register_layer
from ..layers._qkv import QKVLayer, check_int
from ._approx_common import (add_stat, cdiv, check_qkv, check_scale, exact_lse, grid_entry, pad_tokens, softmax_lse,
                             wide_dtype)
from ._combiner_mixture import AXIAL2D_VARIANTS, axial2d_grid, axial2d_pairs

__all__ = ["combiner_attention", "combiner_pairs", "combiner_direct_mask", "Combiner", "VARIANTS", "COMBINER_GRID"]

VARIANTS = ("axial", "fixed") + AXIAL2D_VARIANTS
#: the fidelity grid (``Combiner.fidelity_grid``): per variant, segment factors ``f`` (``segment =
#: round(f * sqrt(T))``; None: the paper's ``sqrt(T)``); training-free there: max-pooled summaries of the
#: model's own q/k/v
COMBINER_GRID = {"axial": (None,), "fixed": (None,), "axial_vertical": (None,), "axial_horizontal": (None,),
                 "mixture": (None, 0.5, 2.0)}


def _check_variant(variant) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    return variant


def combiner_pairs(variant: str, T: int, segment: Optional[int] = None) -> int:
    """combiner_pairs: query-key dot products one head of ``combiner_attention`` computes on ``T``
    tokens (summaries and padding included), the ``stats["pairs"]`` of one head."""
    _check_variant(variant)
    check_int("T", T, 1)
    L = min(math.isqrt(T - 1) + 1 if segment is None else check_int("segment", segment, 1), T)
    n = cdiv(T, L)
    if n == 1:
        return L * L
    if variant in AXIAL2D_VARIANTS:
        return axial2d_pairs(variant, n, L)
    return n * L * L + ((n * L + n * L * n) if variant == "fixed" else L * n * n)


def combiner_direct_mask(variant: str, T: int, segment: Optional[int] = None, *, causal: bool = True,
                         device=None) -> torch.Tensor:
    """combiner_direct_mask: bool ``[T, T]``, the query-key pairs ``combiner_attention`` attends to
    directly (exact scores; every other earlier key is reached through a summary): the own segment /
    row, plus the own column for the axial_vertical / axial_horizontal / mixture variants; causal:
    only keys ``<= `` the query."""
    _check_variant(variant)
    check_int("T", T, 1)
    L = min(math.isqrt(T - 1) + 1 if segment is None else check_int("segment", segment, 1), T)
    i = torch.arange(T, device=device)
    keep = (i[:, None] // L) == (i[None, :] // L)
    if variant in AXIAL2D_VARIANTS:
        keep = keep | ((i[:, None] % L) == (i[None, :] % L))
    return keep & (i[None, :] <= i[:, None]) if causal else keep


def combiner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str = "axial",
                       causal: bool = True, scale: Optional[float] = None, segment: Optional[int] = None,
                       stats: Optional[dict] = None):
    """combiner_attention: Combiner-Axial / -Fixed / -Mixture attention (arXiv 2107.05768).

    Args:
        q, k, v: ``[B, H, T, D]`` (self-attention).
        variant: "axial", "fixed", "axial_vertical", "axial_horizontal" or "mixture" (module docstring).
        segment: tokens per segment/row ``L`` (default ``ceil(sqrt(T))``).
        stats: optional dict; adds ``pairs``: query-key dot products computed (summaries included).
    Returns:
        ``(out [B, H, T, Dv] in q's dtype, lse [B, H, T])``: the lse of the joint softmax.
    """
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    _check_variant(variant)
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
    if variant in AXIAL2D_VARIANTS:
        out, lse = axial2d_grid(qs, ks, vs, real, (o_loc, l_loc), variant=variant, causal=causal, scale=scale,
                                stats=stats)
        return out.reshape(B, H, Tp, Dv)[:, :, :T].to(q.dtype), lse.reshape(B, H, Tp)[:, :, :T]
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

    ``x [B, T, dim] -> [B, T, dim]``; ``variant`` "axial" (Combiner-Axial, default), "fixed"
    (Combiner-Fixed), "mixture" (Combiner-Mixture) or one of its components "axial_vertical" /
    "axial_horizontal" (``combiner_attention``); ``segment`` tokens per row/segment (None:
    ``ceil(sqrt(T))``, the paper's choice). Every output depends on every earlier token (full support)
    at ``O(T sqrt(T))`` cost.
    """

    paper = "Combiner: Full Attention Transformer with Sparse Computation Cost (arXiv 2107.05768)"
    kind = "approx"
    content_based = False
    presets = {"default": {}, "fixed": {"variant": "fixed"}, "mixture": {"variant": "mixture"}}

    def __init__(self, dim: int, heads: int, causal: bool = True, variant: str = "axial",
                 segment: Optional[int] = None, bias: bool = False):
        super().__init__()
        self._init_qkv(dim, heads, causal, bias)
        _check_variant(variant)
        if segment is not None:
            check_int("segment", segment, 1)
        self.variant, self.segment = variant, segment
        self.last_stats: dict = {}

    @classmethod
    def fidelity_grid(cls, D: int, seed: int = 0) -> list[dict]:
        """fidelity_grid: the core's entries of the fidelity grid (``eval.approx_quality``): causal
        ``combiner_attention`` per ``COMBINER_GRID`` variant and segment (method: the registered name
        ``-variant``); the exact part is the lse of the directly attended pairs
        (``combiner_direct_mask``), head by head. Deterministic: ``D`` and ``seed`` are checked, not used."""
        check_int("D", D, 1)
        check_int("seed", seed, 0)
        grid = []
        for variant, factors in COMBINER_GRID.items():
            for f in factors:
                seg = lambda T, f=f: None if f is None else max(1, round(f * math.sqrt(T)))  # noqa: E731

                def cb(q, k, v, st, variant=variant, seg=seg):
                    return combiner_attention(q, k, v, variant=variant, causal=True, segment=seg(q.shape[2]), stats=st)

                def cb_direct(q, k, v, variant=variant, seg=seg):  # lse of the directly attended pairs, head by head
                    keep = combiner_direct_mask(variant, q.shape[2], seg(q.shape[2]), device=q.device)
                    return torch.cat([exact_lse(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], scale=q.shape[-1] ** -0.5,
                                                causal=False, keep=keep)[1] for h in range(q.shape[1])], 1)
                grid.append(grid_entry(f"{cls.name}-{variant}",
                                       "segment=sqrt(T)" if f is None else f"segment={f:g}*sqrt(T)", cb, cb_direct))
        return grid

    def attend(self, q, k, v):
        """``(out, lse)`` of Combiner on q/k/v ``[B, heads, T, head_dim]``."""
        self.last_stats = {}
        return combiner_attention(q, k, v, variant=self.variant, causal=self.causal, segment=self.segment,
                                  stats=self.last_stats)

    def cost(self, T: int) -> dict:
        """``{"density", "flops"}`` of one forward over ``T`` tokens (pairs counted as computed)."""
        pairs = combiner_pairs(self.variant, T, self.segment)
        full = T * (T + 1) / 2 if self.causal else float(T * T)
        return {"density": pairs / full, "flops": 4.0 * pairs * self.dim}
