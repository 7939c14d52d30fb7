"""scatterbrain: Scatterbrain: LSH-clustered exact sparse attention plus a Performer low-rank
estimate of the rest, merged by log-sum-exp without double counting (Scatterbrain: Unifying Sparse
and Low-rank Attention Approximation, arXiv 2110.15343).

``scatterbrain_attention(q, k, v, ...)`` is the core on ``[B, H, T, D]`` returning ``(out, lse)``.
With ``S_i`` the sparse support of query i (the keys in its LSH cluster, causal-masked) and ``phi``
the FAVOR+ features (``_approx_performer``), the paper's estimator is

    y_i = [phi(q_i)^T sum_j phi(k_j) v_j^T + sum_{j in S_i} (exp(s_ij) - phi(q_i).phi(k_j)) v_j]
          / [phi(q_i)^T sum_j phi(k_j)       + sum_{j in S_i} (exp(s_ij) - phi(q_i).phi(k_j))]

which is exactly the lse merge of two disjoint parts: exact softmax on ``S_i`` and the low-rank
estimate on the complement (the low-rank sums minus their terms on ``S_i``). That is how it is
computed (``merge_lse``), so no entry is counted twice and nothing is re-normalised by hand. A
complement whose estimated normaliser after the subtraction is below ``64 eps`` of the whole
low-rank normaliser (what rounding leaves of an empty complement) contributes nothing.
``parts="sparse"`` or ``"lowrank"`` return one part alone (the paper's comparison).

Sparse support (the ``sbsmyrf`` variant): SMYRF's asymmetric transform maps maximum inner product to
nearest neighbour (``q -> [q, 0, sqrt(M_q^2 - |q|^2)]``, ``k -> [k, sqrt(M_k^2 - |k|^2), 0]``),
an angular LSH (Gray-ordered buckets, as ``hyper``) sorts queries and keys, and the sorted
sequences are cut into clusters of ``cluster_size`` (queries into the same number of clusters).

``assign="window"`` (the default of the *causal layer*; the core defaults to SMYRF's ``"rank"``):
with equal chunks of the sorted order, a query's cluster depends on where later tokens hash (and
SMYRF's norm maxima include later tokens), so a causal layer could read the future through the
selection. With ``"window"`` the support of query ``i`` is the ``cluster_size`` most recent keys
``j <= i`` of its own bucket (XBOX maxima as running maxima): it depends on earlier tokens only.

Differences from the paper / authors' code (``HazyResearch/scatterbrain``, read, not copied): one
hash round (SMYRF uses ``n_hashes`` rounds with E2LSH); the angular LSH of ``hyper`` instead of
E2LSH buckets; no feature epsilon; a position mask on the clusters for causality. The low-rank part
is computed in log scale (``_approx_logfavor``: a stabiliser per query row and per feature, a scan
over chunks for the causal sums) where Performer stabilises all keys by one maximum: with a trained
model's large-norm q/k that maximum let whole rows' normalisers underflow and the division's
gradient overflow (NaN under bf16 autocast at widths 128/256, 2026-12-05). The same estimator up to
rounding. The core runs with autocast off (float32 arithmetic, output in q's dtype).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...kernels.merge import merge_lse
from ..base import register_layer
from ..layers._qkv import QKVLayer, check_int
from ._approx_common import (NEG_INF, add_stat, autocast_off, cdiv, check_qkv, check_scale, exact_lse, gather_rows,
                             grid_entry, pad_tokens, softmax_lse, wide_dtype)
from ._approx_lsh import lsh_projections, lsh_rank, sort_by_rank, window_attention
from ._approx_logfavor import log_linear_attention, pair_weights
from ._approx_performer import favor_exponents, orthogonal_features

__all__ = ["scatterbrain_attention", "Scatterbrain", "xbox_transform", "SCATTER_GRID"]

_PARTS = ("both", "sparse", "lowrank")
#: the fidelity grid's budgets (``Scatterbrain.fidelity_grid``): ``(cluster_size, nb_features)`` per
#: assignment (the paper's rule at four budgets, the causal-safe rule at one), and the ablations: the
#: sparse part alone at ``cluster_size`` in ``"sparse"``, the low-rank part alone at ``nb_features`` in
#: ``"lowrank"``
SCATTER_GRID = {"rank": ((64, 64), (128, 128), (256, 256), (512, 512)), "window": ((64, 64),),
                "sparse": (128, 256, 512), "lowrank": (128, 256, 512)}


def xbox_transform(q: torch.Tensor, k: torch.Tensor, running: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SMYRF's asymmetric (XBOX+) transform: ``[..., T, D] -> [..., T, D + 2]`` for q and k, so that
    the Euclidean distance ordering of (q', k') is the inner-product ordering of (q, k). The maxima
    of the norms are taken per leading index, or as running maxima over the tokens so far
    (``running``: token ``t``'s transform then depends on tokens ``<= t`` only)."""
    qn2, kn2 = (q * q).sum(-1, keepdim=True), (k * k).sum(-1, keepdim=True)
    if running:
        mq2, mk2 = torch.cummax(qn2, -2).values, torch.cummax(kn2, -2).values
    else:
        mq2, mk2 = qn2.amax(-2, keepdim=True), kn2.amax(-2, keepdim=True)
    z_q, z_k = torch.zeros_like(qn2), torch.zeros_like(kn2)
    q2 = torch.cat([q, z_q, (mq2 - qn2).clamp_min(0).sqrt()], -1)
    k2 = torch.cat([k, (mk2 - kn2).clamp_min(0).sqrt(), z_k], -1)
    return q2, k2


def _window_lowrank(eq, eks, vs, idx, keep, C):
    """The low-rank terms ``sum_{j in window} phi(q_i).phi(k_j) [v_j]`` of each row's window support
    (``idx``/``keep`` from ``window_attention``) on the rows' scale ``exp(C_i)`` (``eq``/``eks``: the
    query and sorted key exponents), in row chunks of bounded memory."""
    B, H, T, w = idx.shape
    step = max(1, (1 << 24) // max(B * H * w * (eks.shape[-1] + vs.shape[-1]), 1))
    nums, dens = [], []
    for a in range(0, T, step):
        ix, kp = idx[:, :, a:a + step], keep[:, :, a:a + step]
        flat = ix.reshape(B, H, -1)
        ekg = eks.gather(-2, flat[..., None].expand(*flat.shape, eks.shape[-1])).reshape(*ix.shape, -1)
        vg = vs.gather(-2, flat[..., None].expand(*flat.shape, vs.shape[-1])).reshape(*ix.shape, -1)
        s = pair_weights(eq[:, :, a:a + step, None, :], ekg, C[:, :, a:a + step, None], kp)
        nums.append(torch.einsum("bhiw,bhiwd->bhid", s, vg))
        dens.append(s.sum(-1))
    return torch.cat(nums, 2), torch.cat(dens, 2)


def scatterbrain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, features: torch.Tensor,
                           lsh_proj: torch.Tensor, causal: bool = True, scale: Optional[float] = None,
                           cluster_size: int = 64, parts: str = "both", chunk: int = 64,
                           stats: Optional[dict] = None, assign: str = "rank"):
    """scatterbrain_attention: Scatterbrain estimate of softmax attention (arXiv 2110.15343).

    Args:
        q, k, v: ``[B, H, T, D]`` (self-attention, equal lengths).
        features: Performer directions ``[m, D]`` (``_approx_performer.orthogonal_features``).
        lsh_proj: LSH hyperplanes ``[D + 2, r]`` for the XBOX-transformed vectors.
        causal: causal self-attention.
        cluster_size: keys per LSH cluster (the sparse support size of a query).
        parts: "both" (Scatterbrain), "sparse" (the LSH part alone, SMYRF/Reformer-like) or
            "lowrank" (the Performer estimate alone).
        chunk: chunk length of the causal prefix sums.
        assign: "rank" (SMYRF: clusters = equal chunks of the sorted queries and keys) or "window"
            (causal: each query's support is the ``cluster_size`` most recent keys of its own bucket;
            non-causal: the ``cluster_size`` sorted keys centred where its bucket falls).
        stats: optional dict; adds ``pairs`` (exact q-k dot products) and ``lowrank`` (the low-rank
            part in key-pair equivalents: ``m`` random features per query cost what ``m`` keys cost),
            summed over batch and heads.
    Returns:
        ``(out [B, H, T, Dv] in q's dtype, lse [B, H, T])``.
    """
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    if parts not in _PARTS:
        raise ValueError(f"parts: expected one of {_PARTS}, got {parts!r}")
    if assign not in ("rank", "window"):
        raise ValueError(f"assign: expected 'rank' or 'window', got {assign!r}")
    check_int("cluster_size", cluster_size, 1)
    check_int("chunk", chunk, 1)
    D = q.shape[-1]
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != D:
        raise ValueError(f"features: expected Performer directions [m, {D}], got {tuple(getattr(features, 'shape', ()))}")
    if not isinstance(lsh_proj, torch.Tensor) or lsh_proj.dim() != 2 or lsh_proj.shape[0] != D + 2:
        raise ValueError(f"lsh_proj: expected LSH hyperplanes [{D + 2}, r], got {tuple(getattr(lsh_proj, 'shape', ()))}")
    with autocast_off(q):  # float32 arithmetic under bf16 autocast (the complement subtracts near-equal sums)
        return _estimate(q, k, v, features, lsh_proj, causal, scale, cluster_size, parts, chunk, stats, assign)


def _estimate(q, k, v, features, lsh_proj, causal, scale, cluster_size, parts, chunk, stats, assign):
    """The body of ``scatterbrain_attention`` (arguments checked; autocast off)."""
    B, H, T, _ = q.shape
    dt = wide_dtype(q)
    per = B * H
    pos = torch.arange(T, device=q.device).expand(B, H, T)
    use_sparse, use_lr = parts in ("both", "sparse"), parts in ("both", "lowrank")
    out_parts = []
    if use_lr:
        eq = favor_exponents(q, features.to(q.device), scale)
        ek = favor_exponents(k, features.to(q.device), scale)
        num, den, c_row = log_linear_attention(eq, ek, v.to(dt), causal=causal, chunk=chunk)
        den_all = den
        add_stat(stats, "lowrank", per * T * features.shape[0])
    if use_sparse and assign == "window" and cluster_size >= T:  # every key is in the support: exact
        o_s, l_s = exact_lse(q, k, v, scale=scale, causal=causal)
        add_stat(stats, "pairs", per * T * T)
        out_parts.append((o_s, l_s))
        if use_lr:  # nothing is left for the low-rank part
            den = torch.zeros_like(den)
    elif use_sparse and assign == "window":
        q2, k2 = xbox_transform(q.to(dt), k.to(dt), running=causal)
        q_rank, k_rank = lsh_rank(q2, lsh_proj.to(q.device)), lsh_rank(k2, lsh_proj.to(q.device))
        c = min(cluster_size, T)
        if causal:  # the c most recent keys of the query's own bucket: sort keys by (bucket, position)
            comp = k_rank * T + pos
            k_order, _ = sort_by_rank(comp)
            start = torch.searchsorted(comp.gather(-1, k_order).contiguous(), (q_rank * T + pos).contiguous(),
                                       right=True) - c
            same = (q_rank, k_rank.gather(-1, k_order))
        else:  # the c keys centred where the query's bucket falls
            k_order, _ = sort_by_rank(k_rank)
            start = (torch.searchsorted(k_rank.gather(-1, k_order).contiguous(), q_rank.contiguous()) - c // 2
                     ).clamp(0, T - c)
            same = None
        ks, vs = gather_rows(k.to(dt), k_order), gather_rows(v.to(dt), k_order)
        o_s, l_s, idx, keep = window_attention(q.to(dt), ks, vs, start, c, scale=scale, same=same)
        add_stat(stats, "pairs", per * T * c)
        out_parts.append((o_s, l_s))
        if use_lr:
            n_sub, d_sub = _window_lowrank(eq, gather_rows(ek, k_order), vs, idx, keep, c_row)
            num, den = num - n_sub, den - d_sub
    elif use_sparse:
        q2, k2 = xbox_transform(q.to(dt), k.to(dt))
        q_order, q_inv = sort_by_rank(lsh_rank(q2, lsh_proj.to(q.device)))
        k_order, _ = sort_by_rank(lsh_rank(k2, lsh_proj.to(q.device)))
        n = cdiv(T, cluster_size)
        b = cdiv(T, n)
        Tp = n * b

        def blocks(x, order):
            return pad_tokens(gather_rows(x.to(dt), order), Tp).reshape(B, H, n, b, x.shape[-1])

        qs, ks, vs = blocks(q, q_order), blocks(k, k_order), blocks(v, k_order)
        big = torch.iinfo(torch.int64).max
        qp = torch.nn.functional.pad(pos.gather(-1, q_order), (0, Tp - T), value=-1).reshape(B, H, n, b)
        kp = torch.nn.functional.pad(pos.gather(-1, k_order), (0, Tp - T), value=big).reshape(B, H, n, b)
        keep = kp[..., None, :] < big
        keep = keep & (qp[..., :, None] >= 0)
        if causal:
            keep = keep & (kp[..., None, :] <= qp[..., :, None])
        s = torch.matmul(qs, ks.transpose(-1, -2)) * scale  # [B, H, n, b, b]
        o_s, l_s = softmax_lse(s, vs, keep)
        add_stat(stats, "pairs", per * n * b * b)
        unsort = lambda x: gather_rows(x.reshape(B, H, Tp, -1)[:, :, :T], q_inv)  # noqa: E731
        out_parts.append((unsort(o_s), unsort(l_s[..., None])[..., 0]))
        if use_lr:
            # the low-rank terms on the support, removed from the low-rank sums (no double counting)
            eqs = pad_tokens(gather_rows(eq, q_order), Tp).reshape(B, H, n, b, 1, -1)
            eks = pad_tokens(gather_rows(ek, k_order), Tp).reshape(B, H, n, 1, b, -1)
            cs = pad_tokens(gather_rows(c_row[..., None], q_order), Tp).reshape(B, H, n, b, 1)
            a = pair_weights(eqs, eks, cs, keep)
            num = num - unsort(torch.matmul(a, vs))
            den = den - unsort(a.sum(-1, keepdim=True))[..., 0]
    if use_lr:
        # what rounding leaves of an empty complement is empty (den_all >= 1/m on the rows' log scale, so
        # den is never near the float range's floor: the division's gradient num / den**2 stays finite)
        ok = den > 64 * torch.finfo(dt).eps * den_all
        den_safe = torch.where(ok, den, torch.ones_like(den))
        o_lr = torch.where(ok[..., None], num / den_safe[..., None], torch.zeros_like(num))
        l_lr = torch.where(ok, torch.log(den_safe) + c_row, torch.full_like(den, NEG_INF))
        out_parts.append((o_lr, l_lr))
    out, lse = merge_lse(out_parts)
    return out.to(q.dtype), lse.to(dt)


@register_layer("scatterbrain")
class Scatterbrain(QKVLayer):
    """Scatterbrain: LSH sparse + Performer low-rank attention layer (Scatterbrain: Unifying Sparse
    and Low-rank Attention Approximation, arXiv 2110.15343).

    ``x [B, T, dim] -> [B, T, dim]``; ``nb_features`` random features (default Performer's
    ``int(head_dim * ln(head_dim))``), ``cluster_size`` keys per LSH cluster, ``lsh_num_projs``
    hyperplanes, ``parts`` to train one part alone, ``assign`` (None: ``"window"`` when causal, see
    the module docstring). Random directions are fixed buffers drawn from
    ``seed`` (the authors redraw the Performer features periodically; not done here).
    """

    paper = "Scatterbrain: Unifying Sparse and Low-rank Attention Approximation (arXiv 2110.15343)"
    kind = "approx"
    content_based = True
    presets = {"default": {}, "mqar": {"cluster_size": 32, "nb_features": 32}}

    def __init__(self, dim: int, heads: int, causal: bool = True, nb_features: Optional[int] = None,
                 cluster_size: int = 64, lsh_num_projs: int = 7, parts: str = "both", assign: Optional[str] = None,
                 seed: int = 0, bias: bool = False):
        super().__init__()
        self._init_qkv(dim, heads, causal, bias)
        d = self.head_dim
        m = int(d * math.log(d)) if nb_features is None else nb_features
        check_int("nb_features", max(m, 1) if nb_features is None else m, 1)
        check_int("cluster_size", cluster_size, 1)
        check_int("lsh_num_projs", lsh_num_projs, 1)
        check_int("seed", seed, 0)
        if parts not in _PARTS:
            raise ValueError(f"parts: expected one of {_PARTS}, got {parts!r}")
        if assign is not None and assign not in ("rank", "window"):
            raise ValueError(f"assign: expected 'rank', 'window' or None, got {assign!r}")
        self.assign = assign if assign is not None else ("window" if causal else "rank")
        self.cluster_size, self.parts = cluster_size, parts
        self.register_buffer("features", orthogonal_features(max(m, 1), d, seed))
        self.register_buffer("lsh_proj", lsh_projections(d + 2, lsh_num_projs, seed + 1))
        self.last_stats: dict = {}

    @classmethod
    def fidelity_grid(cls, D: int, seed: int = 0) -> list[dict]:
        """fidelity_grid: the core's entries of the fidelity grid (``eval.approx_quality``) for head width
        ``D``: causal ``scatterbrain_attention`` at the ``SCATTER_GRID`` budgets (method: the registered
        name, its ``-window`` row for ``assign="window"``), then the paper's ablations, the sparse part
        alone (``-sparse``) and the low-rank part alone (``-lowrank``, no exact part). Hyperplanes
        ``lsh_projections(D + 2, 7, seed + 1)`` (the layer's), features ``orthogonal_features(m, D, seed)``;
        the exact part is the LSH support (the ``parts="sparse"`` lse)."""
        check_int("D", D, 1)
        check_int("seed", seed, 0)
        sp = lsh_projections(D + 2, 7, seed + 1)
        grid = []
        for assign, suffix in (("rank", ""), ("window", "-window")):
            for c, m in SCATTER_GRID[assign]:
                feats = orthogonal_features(m, D, seed)

                def sb(q, k, v, st, c=c, f=feats, parts="both", assign=assign):
                    return scatterbrain_attention(q, k, v, features=f, lsh_proj=sp, causal=True, cluster_size=c,
                                                  parts=parts, stats=st, assign=assign)
                grid.append(grid_entry(cls.name + suffix, f"cluster={c},features={m}", sb,
                                       lambda q, k, v, sb=sb: sb(q, k, v, None, parts="sparse")[1]))
        for c in SCATTER_GRID["sparse"]:
            def ls(q, k, v, st, c=c):
                return scatterbrain_attention(q, k, v, features=orthogonal_features(1, D, seed), lsh_proj=sp,
                                              causal=True, cluster_size=c, parts="sparse", stats=st)
            grid.append(grid_entry(cls.name + "-sparse", f"cluster={c}", ls,
                                   lambda q, k, v, ls=ls: ls(q, k, v, None)[1]))
        for m in SCATTER_GRID["lowrank"]:
            f = orthogonal_features(m, D, seed)
            grid.append(grid_entry(cls.name + "-lowrank", f"features={m}",
                                   lambda q, k, v, st, f=f: scatterbrain_attention(q, k, v, features=f, lsh_proj=sp,
                                                                                   causal=True, parts="lowrank",
                                                                                   stats=st)))
        return grid

    def attend(self, q, k, v):
        """``(out, lse)`` of Scatterbrain on q/k/v ``[B, heads, T, head_dim]``."""
        self.last_stats = {}
        return scatterbrain_attention(q, k, v, features=self.features, lsh_proj=self.lsh_proj, causal=self.causal,
                                      cluster_size=self.cluster_size, parts=self.parts, stats=self.last_stats,
                                      assign=self.assign)

    def cost(self, T: int) -> dict:
        """``{"density", "flops"}``: exact pairs of the clusters plus the low-rank part counted as
        ``nb_features`` keys per query (its cost per query is that of attending to that many keys)."""
        check_int("T", T, 1)
        n = cdiv(T, self.cluster_size)
        if self.parts == "lowrank":
            pairs = 0
        else:
            pairs = n * cdiv(T, n) ** 2 if self.assign == "rank" else T * min(self.cluster_size, T)
        if self.parts != "sparse":
            pairs += T * self.features.shape[0]
        full = T * (T + 1) / 2 if self.causal else float(T * T)
        return {"density": pairs / full, "flops": 4.0 * pairs * self.dim}
