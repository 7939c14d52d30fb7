"""_combiner_mixture: Combiner-Axial's vertical and horizontal factorisations and Combiner-Mixture,
their two-component mixture (Combiner: Full Attention Transformer with Sparse Computation Cost,
arXiv 2107.05768, sections 3.3 and 4.3).

Helper of ``combiner.py`` (``_``-prefixed: not scanned by the layer registry). Everything works on
the token grid of ``combiner_attention``: ``n`` rows of ``L`` tokens, token ``(r, c)`` = position
``r * L + c``, tensors ``[B, H, n, L, D]``, ``real [n, L]`` false on the padding after the last
token. Below, "earlier rows" of row ``r`` are ``R(r) = {r' < r}`` (causal) or ``{r' != r}``
(non-causal).

Both plans share the direct set of the sparse axial pattern, ``Omega^0`` = the query's own row
(causal: its prefix) plus its own column in the earlier rows. The other keys are reached through
summaries: a summary of a region ``Omega`` has key ``max-pool_{j in Omega} k_j`` and value
``sum_{j in Omega} softmax_j(q_Omega . k_j * scale) v_j`` with ``q_Omega = max-pool_{j in Omega} q_j``
(the paper's section 3.2), and enters the query's softmax with logit ``q_i . k_Omega * scale``.

* ``axial_vertical`` (the paper's ``omega_axial-vertical``, figure 2(A)): one summary per other
  column ``t != c``: column ``t`` restricted to the rows ``R(r)``.
* ``axial_horizontal`` (``omega_axial-horizontal``, figure 2(B)): one summary per earlier row
  ``r' in R(r)``: row ``r'`` without column ``c``.
* ``mixture`` (Combiner-Mixture, section 3.3 "Improving Expressiveness Using a Mixture Model"):
  ``A(x_i) = 1/M sum_m A(x_i; omega_m)`` with ``M = 2`` components, the vertical and the horizontal
  plan, each normalised on its own (eq. 9). Each earlier key is reached exactly once per component
  (direct or through one summary), so the implied attention ``(P_vertical + P_horizontal) / 2``
  sums to 1 over all earlier keys.

Each component is one softmax over its direct scores and its summary logits, computed as ``(out,
lse)`` parts (own row, own column, summaries) merged by ``sparsattn.kernels.merge.merge_lse``. The
mixture merges the two components with ``merge_lse`` too, both entered with one shared lse
``log((Z_v + Z_h) / 2) - log 2`` so that each gets weight ``1/M``; the returned lse is
``log((Z_v + Z_h) / 2)``, the mean of the components' normalisers (the paper defines no lse for the
mixture; merging it with extra keys is exact where both components are exact, e.g. one segment or
``segment=1``). Cost per head, with ``P = n L^2 + L n^2`` (``= T_pad (L + n)``, ``O(T sqrt T)`` at
``L = sqrt T``): direct ``P``, each plan's summaries another ``P`` (local expectations + summary
logits); vertical or horizontal ``2P``, mixture ``3P`` (the direct part is shared).

Differences from the paper and the authors' code (``google-research/combiner``: TensorFlow
``approx_attention.axial_mixture_unidir`` / ``axial_mixture_bidir``, JAX ``layer._AxialMixtureAtt``;
read and compared, not copied):

1. Mixture weights: the paper averages separately normalised components (1/M each); the authors'
   code instead puts the shared direct part and both plans' summaries into ONE softmax (direct keys
   counted once, every off-direct key reached through two summaries of one distribution). We follow
   the paper. Which two plans form the mixture is not said in the paper's main text; we take the
   authors' code's pair (vertical + horizontal), not axial + fixed.
2. Horizontal summaries: the paper has one summary per earlier row excluding ``col_i``; the code
   splits it into two (the row's columns left of ``c``, "top-left", and right of ``c``,
   "top-right"). We follow the paper: one leave-one-out summary per row.
3. Pooling: max-pooling of keys and queries (paper section 3.2, JAX ``lax.cummax``); the TF code's
   ``approx_cummax`` is a cumulative sum.
4. Non-causal: the paper's MLM forms are in its appendix C, which we did not read. The authors'
   ``axial_mixture_bidir`` attends to the whole row and the whole column directly (the query's own
   key twice, a TODO there) and adds above/below and left/right summaries for every column and row,
   the query's own included (overlapping the direct set). We use the partition: direct = own row and
   own column (self once), vertical = column ``t != c`` without row ``r``, horizontal = row
   ``r' != r`` without column ``c``.
5. A sequence that is not a multiple of ``L`` is padded at the end; padded tokens are in no region,
   empty regions are dropped. One segment (``segment >= T``) and ``segment = 1`` give exact attention.
6. No attention dropout, no DeepSets summaries; the softmax scale applies to the summaries' local
   scores too (the JAX code scales the query before pooling: the same).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...kernels.merge import merge_lse
from ._approx_common import add_stat, softmax_lse

__all__ = ["AXIAL2D_VARIANTS", "axial2d_grid", "axial2d_pairs"]

AXIAL2D_VARIANTS = ("axial_vertical", "axial_horizontal", "mixture")


def axial2d_pairs(variant: str, n: int, L: int) -> int:
    """Query-key dot products of one head of ``variant`` on an ``n x L`` grid (``n > 1``; one row is
    exact attention, ``L * L``)."""
    p = n * L * L + L * n * n
    return (3 if variant == "mixture" else 2) * p


def _shift(x: torch.Tensor, dim: int, fill, forward: bool) -> torch.Tensor:
    """``x`` moved one step along ``dim`` (forward: entry i gets entry i-1), ``fill`` entering."""
    edge = torch.full_like(x.narrow(dim, 0, 1), fill)
    m = x.shape[dim] - 1
    return torch.cat([edge, x.narrow(dim, 0, m)] if forward else [x.narrow(dim, 1, m), edge], dim)


def _pool_others(x: torch.Tensor, valid: torch.Tensor, dim: int, prefix: bool):
    """Max-pool of ``x [..., n, L, D]`` over the other valid entries along grid axis ``dim`` (-3: rows,
    -2: columns): entry i gets the max over valid j < i (``prefix``) or j != i. Returns ``(pooled
    [..., n, L, D], nonempty [n, L])``; empty regions get a pooled 0 (finite, masked by the caller)."""
    neg = torch.finfo(x.dtype).min
    xm = x.masked_fill(~valid[..., None], neg)
    vdim = dim + 1
    cnt = valid.long()
    pooled = _shift(torch.cummax(xm, dim).values, dim, neg, True)
    count = _shift(cnt.cumsum(vdim), vdim, 0, True)
    if not prefix:
        suf = torch.flip(torch.cummax(torch.flip(xm, [dim]), dim).values, [dim])
        pooled = torch.maximum(pooled, _shift(suf, dim, neg, False))
        count = cnt.sum(vdim, keepdim=True) - cnt
    nonempty = count > 0
    return torch.where(nonempty[..., None], pooled, torch.zeros_like(pooled)), nonempty


def axial2d_grid(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, real: torch.Tensor,
                 row: tuple[torch.Tensor, torch.Tensor], *, variant: str, causal: bool, scale: float,
                 stats: Optional[dict] = None):
    """axial2d_grid: Combiner axial-vertical / axial-horizontal / mixture on the grid (module docstring).

    Args:
        qs, ks, vs: ``[B, H, n, L, D(v)]`` (``n > 1``), padded tokens anywhere ``real`` is false.
        real: bool ``[n, L]``.
        row: ``(out [B, H, n, L, Dv], lse [B, H, n, L])`` of the own-row direct part (causal: prefix),
            computed by the caller.
        variant: one of ``AXIAL2D_VARIANTS``.
        stats: optional dict; adds ``pairs`` (dot products computed here, the own-row part excluded).
    Returns:
        ``(out [B, H, n, L, Dv], lse [B, H, n, L])`` on the grid.
    """
    B, H, n, L, _ = qs.shape
    dev = qs.device
    ni, li = torch.arange(n, device=dev), torch.arange(L, device=dev)
    earlier = (ni[None, :] < ni[:, None]) if causal else (ni[None, :] != ni[:, None])  # [r, r']
    other_col = li[None, :] != li[:, None]  # [c, t]
    cols = lambda t: t.transpose(2, 3)  # noqa: E731  [B, H, n, L, .] <-> [B, H, L, n, .]
    qc, kc, vc = cols(qs), cols(ks), cols(vs)
    col_keep = earlier[None] & real.T[:, None, :]  # [column, r, r']: the earlier real rows of a column
    # direct: own column in the earlier rows (the own row is `row`)
    s_col = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, H, L, n, n]
    o_col, l_col = softmax_lse(s_col, vc, col_keep)
    direct = [row, (cols(o_col), l_col.transpose(2, 3))]
    add_stat(stats, "pairs", B * H * L * n * n)
    comps = []
    if variant in ("axial_vertical", "mixture"):
        # region (r, t): column t in the rows R(r); its local expectation over those rows of column t
        qv, nonempty = _pool_others(qs, real, -3, prefix=causal)
        kv, _ = _pool_others(ks, real, -3, prefix=causal)
        s_loc = torch.matmul(cols(qv), kc.transpose(-1, -2)) * scale  # [B, H, t, r, r']
        v_sum = cols(softmax_lse(s_loc, vc, col_keep)[0])  # [B, H, r, t, Dv]
        s_sum = torch.matmul(qs, kv.transpose(-1, -2)) * scale  # [B, H, r, c, t]
        part = softmax_lse(s_sum, v_sum, other_col[None] & nonempty[:, None, :])
        comps.append(merge_lse(direct + [part]))
        add_stat(stats, "pairs", B * H * (L * n * n + n * L * L))
    if variant in ("axial_horizontal", "mixture"):
        # region (r', c): row r' without column c; reached from the rows r with r' in R(r)
        qh, nonempty = _pool_others(qs, real, -2, prefix=False)
        kh, _ = _pool_others(ks, real, -2, prefix=False)
        s_loc = torch.matmul(qh, ks.transpose(-1, -2)) * scale  # [B, H, r', c, t]
        v_sum = softmax_lse(s_loc, vs, other_col[None] & real[:, None, :])[0]  # [B, H, r', c, Dv]
        s_sum = torch.matmul(qc, cols(kh).transpose(-1, -2)) * scale  # [B, H, c, r, r']
        o, l = softmax_lse(s_sum, cols(v_sum), earlier[None] & nonempty.T[:, None, :])
        comps.append(merge_lse(direct + [(cols(o), l.transpose(2, 3))]))
        add_stat(stats, "pairs", B * H * (n * L * L + L * n * n))
    if len(comps) == 1:
        return comps[0]
    (o_v, l_v), (o_h, l_h) = comps
    # paper: A = (A_vertical + A_horizontal) / 2; merge_lse gives equal weights to equal lses, and the
    # merged lse is log((Z_v + Z_h) / 2)
    shared = torch.logaddexp(l_v, l_h) - 2 * math.log(2)
    return merge_lse([(o_v, shared), (o_h, shared)])
