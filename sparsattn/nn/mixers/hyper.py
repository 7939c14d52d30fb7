"""hyper: HyperAttention: sortLSH block-diagonal attention plus a sampled residual, merged by
log-sum-exp; causal by the paper's recursion (HyperAttention: Long-context Attention in Near-Linear
Time, arXiv 2310.05869).

``hyper_attention(q, k, v, proj=...)`` is the core on ``[B, H, T, D]`` tensors returning
``(out, lse)``; the ``hyper`` layer wraps it with q/k/v projections, and the ``hyper`` prefill method
(``sparsattn/methods/hyper_attention.py``) calls the same core inside a pretrained model.

Algorithm (non-causal, one head):

1. hash queries and keys with ``lsh_num_projs`` random hyperplanes, order the buckets by their rank
   in the Gray sequence, stable-sort q and k (v with k) by bucket;
2. block-diagonal part: the sorted sequences are cut into blocks of ``block_size`` keys (queries
   into the same number of blocks); exact attention inside each block, with its lse;
3. residual part: ``sample_size`` key indices drawn uniformly (with replacement) from the sorted
   keys; every query attends to them, with the pairs already in its own diagonal block masked (no
   double counting), and ``log(n_keys / sample_size)`` added to the lse (the sum over the rest is
   estimated by the reweighted sample);
4. both parts merged by lse (``sparsattn.kernels.merge.merge_lse``), rows un-sorted.

Below ``min_seq_len`` queries the non-causal problem is computed exactly. Causal: a sequence of at
most ``min_seq_len`` tokens is exact causal attention; a longer one is split in halves: both halves
are causal sub-problems (recursion), the lower-left quadrant (second-half queries on first-half
keys) is the non-causal problem above, and the parts are merged by lse. The recursion is unrolled:
all sub-problems of one level are one batched call, and every level's part is merged once.

Defaults are the authors' (``lsh_num_projs=7, block_size=256, sample_size=256, min_seq_len=4096``).
With ``min_seq_len >= T`` (causal) or ``block_size >= T`` it is exact attention.

Differences from the paper / the authors' code (``insuhan/hyper-attn``, read, not copied):

* buckets are sorted by the code's *rank* in the Gray sequence (inverse Gray code), as the paper
  describes; the authors' ``AngularLSH.hash`` indexes the Gray sequence by the code (the forward
  map), which does not put one-bit neighbours next to each other;
* block padding: the authors pad the sorted keys with zero vectors (score 0, which adds spurious
  mass); here padded keys are masked;
* the authors' CUDA path does not mask the residual's pairs inside the diagonal block (double
  counting); here they are always masked;
* the causal recursion pads the sequence once, to ``leaf * 2**levels`` tokens (the authors pad each
  odd half by one row); padding is at the end, so it never reaches a real query;
* the lse is differentiable (the authors' Triton path detaches it);
* ``assign="window"`` (the default of the *causal layer*; the core and the prefill method default
  to the paper's ``"rank"``): in the paper, which keys a query reads depends on where the *other*
  queries of its quadrant fall in the sorted order, i.e. on later tokens, so a causal layer trained
  with it could read the future through the selection. With ``"window"`` each query reads the
  ``block_size`` sorted keys centred where its own bucket falls among them (``searchsorted``), so
  its output depends only on itself and earlier tokens; the cost is the same per query.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...kernels.merge import merge_lse
from ..base import register_layer
from ..layers._qkv import QKVLayer, check_int
from ._approx_common import (NEG_INF, add_stat, cdiv, check_generator, check_qkv, check_scale, exact_lse, gather_rows,
                             grid_entry, pad_tokens, softmax_lse, wide_dtype)
from ._approx_lsh import lsh_projections, lsh_rank, sort_by_rank, sorted_block_attention, window_attention

__all__ = ["hyper_attention", "HyperAttention", "check_hyper_config", "ASSIGN", "HYPER_GRID"]

ASSIGN = ("rank", "window")
#: the fidelity grid's budgets (``HyperAttention.fidelity_grid``): ``(min_seq_len, block_size, sample_size)``
#: per assignment; the paper's rule at four budgets, the causal-safe rule (slower gathers on the CPU) at one
HYPER_GRID = {"rank": ((256, 64, 64), (512, 128, 128), (1024, 256, 256), (2048, 512, 512)),
              "window": ((512, 128, 128),)}


def check_hyper_config(lsh_num_projs, block_size, sample_size, min_seq_len) -> None:
    """ValueError naming the hyper-parameter that is out of range."""
    check_int("lsh_num_projs", lsh_num_projs, 1)
    if lsh_num_projs > 30:
        raise ValueError(f"lsh_num_projs: expected at most 30 hyperplanes, got {lsh_num_projs}")
    check_int("block_size", block_size, 1)
    check_int("sample_size", sample_size, 0)
    check_int("min_seq_len", min_seq_len, 1)


def _noncausal(q, k, v, proj, *, scale, block_size, sample_size, min_seq_len, generator, stats, assign="rank"):
    """Non-causal HyperAttention of q ``[..., nq, D]`` on k/v ``[..., nk, D]``: ``(out, lse)`` float32."""
    nq, nk = q.shape[-2], k.shape[-2]
    per = math.prod(q.shape[:-2])  # independent problems (batch x heads x segments)
    if nq < min_seq_len:
        add_stat(stats, "pairs", per * nq * nk)
        return exact_lse(q, k, v, scale=scale, causal=False)
    q_rank, k_rank = lsh_rank(q, proj), lsh_rank(k, proj)
    k_order, _ = sort_by_rank(k_rank)
    ks, vs = gather_rows(k, k_order), gather_rows(v, k_order)
    w = wide_dtype(q)
    if assign == "rank":  # the paper: the i-th block of sorted queries with the i-th block of sorted keys
        q_order, q_inv = sort_by_rank(q_rank)
        qs = gather_rows(q, q_order)
        n_blocks = cdiv(nk, block_size)
        bq, bk = cdiv(nq, n_blocks), cdiv(nk, n_blocks)
        out_b, lse_b = sorted_block_attention(qs, ks, vs, n_blocks, scale=scale)
        add_stat(stats, "pairs", per * n_blocks * bq * bk)
        lo = (torch.arange(nq, device=q.device) // bq * bk).expand(*q.shape[:-2], nq)
        width, multi_block = bk, nq > bq and nk > bk
    else:  # "window": each query reads the block_size sorted keys centred on its own bucket's place
        qs, q_inv = q, None
        width = min(block_size, nk)
        pos = torch.searchsorted(k_rank.gather(-1, k_order).contiguous(), q_rank.contiguous())
        lo = (pos - width // 2).clamp(0, nk - width)
        out_b, lse_b, _, _ = window_attention(q, ks, vs, lo, width, scale=scale)
        add_stat(stats, "pairs", per * nq * width)
        multi_block = nk > width
    parts = [(out_b, lse_b)]
    if sample_size > 0 and multi_block:
        idx = torch.randint(nk, (*q.shape[:-2], sample_size), device=q.device, generator=generator)
        s = torch.matmul(qs.to(w), gather_rows(ks, idx).to(w).transpose(-1, -2)) * scale
        inside = (idx[..., None, :] >= lo[..., None]) & (idx[..., None, :] < lo[..., None] + width)
        out_r, lse_r = softmax_lse(s, gather_rows(vs, idx).to(w), ~inside)
        parts.append((out_r, lse_r + math.log(nk / sample_size)))
        add_stat(stats, "pairs", per * nq * sample_size)
    out, lse = merge_lse(parts)
    if q_inv is None:
        return out, lse
    return gather_rows(out, q_inv), lse.gather(-1, q_inv)


def hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, proj: torch.Tensor, causal: bool = True,
                    scale: Optional[float] = None, block_size: int = 256, sample_size: int = 256,
                    min_seq_len: int = 4096, generator: Optional[torch.Generator] = None,
                    stats: Optional[dict] = None, assign: str = "rank"):
    """hyper_attention: HyperAttention of q ``[B, H, T, D]`` on k, v ``[B, H, T, D]`` (arXiv 2310.05869).

    Args:
        proj: LSH hyperplanes ``[D, lsh_num_projs]`` (``_approx_lsh.lsh_projections``).
        causal: causal self-attention (the paper's recursion) or non-causal (``Tq != Tk`` allowed).
        scale: softmax scale (default ``1/sqrt(D)``).
        block_size, sample_size, min_seq_len: as in the module docstring.
        generator: torch.Generator for the residual sample (None: the global RNG).
        stats: optional dict; ``stats["pairs"]`` is increased by the number of query-key dot products
            computed (summed over batch and heads).
        assign: "rank" (the paper: equal blocks of the sorted queries and keys) or "window" (each
            query reads the ``block_size`` sorted keys centred where its bucket falls among them).
    Returns:
        ``(out [B, H, T, Dv] in q's dtype, lse [B, H, T] float32, float64 for float64 inputs)``: natural-log lse of the estimated
        softmax normaliser (mergeable with other parts by ``merge_lse``).
    """
    check_qkv(q, k, v, same_len=causal)
    scale = check_scale(scale, q.shape[-1])
    if not isinstance(proj, torch.Tensor) or proj.dim() != 2 or proj.shape[0] != q.shape[-1]:
        raise ValueError(f"proj: expected LSH hyperplanes [{q.shape[-1]}, n_projs], got "
                         f"{tuple(getattr(proj, 'shape', ())) or type(proj).__name__}")
    check_hyper_config(proj.shape[1], block_size, sample_size, min_seq_len)
    check_generator(generator, q.device)
    if assign not in ASSIGN:
        raise ValueError(f"assign: expected one of {ASSIGN}, got {assign!r}")
    proj = proj.to(q.device)
    kw = dict(scale=scale, block_size=block_size, sample_size=sample_size, min_seq_len=min_seq_len,
              generator=generator, stats=stats, assign=assign)
    if not causal:
        out, lse = _noncausal(q, k, v, proj, **kw)
        return out.to(q.dtype), lse.to(wide_dtype(q))
    B, H, T, D = q.shape
    if T <= min_seq_len:
        add_stat(stats, "pairs", B * H * T * (T + 1) / 2)
        out, lse = exact_lse(q, k, v, scale=scale, causal=True)
        return out.to(q.dtype), lse.to(wide_dtype(q))
    levels, leaf = 0, T
    while leaf > min_seq_len:
        leaf = cdiv(leaf, 2)
        levels += 1
    Tp = leaf << levels
    qp, kp, vp = (pad_tokens(t, Tp) for t in (q, k, v))
    Dv = v.shape[-1]
    nseg = 1 << levels
    # leaves: exact causal attention inside each of the 2**levels segments
    out_l, lse_l = exact_lse(qp.reshape(B, H, nseg, leaf, D), kp.reshape(B, H, nseg, leaf, D),
                             vp.reshape(B, H, nseg, leaf, Dv), scale=scale, causal=True)
    add_stat(stats, "pairs", B * H * nseg * leaf * (leaf + 1) / 2)
    parts = [(out_l.reshape(B, H, Tp, Dv), lse_l.reshape(B, H, Tp))]
    for lev in range(levels):  # level lev: 2**lev segments, each split into two halves of h tokens
        ns, h = 1 << lev, Tp >> (lev + 1)
        qq = qp.reshape(B, H, ns, 2, h, D)[:, :, :, 1]
        kk = kp.reshape(B, H, ns, 2, h, D)[:, :, :, 0]
        vv = vp.reshape(B, H, ns, 2, h, Dv)[:, :, :, 0]
        o, l = _noncausal(qq, kk, vv, proj, **kw)  # [B, H, ns, h, Dv]
        # rows of the first halves get nothing from this level (out 0, lse -inf)
        o = torch.stack([torch.zeros_like(o), o], dim=3).reshape(B, H, Tp, Dv)
        l = torch.stack([torch.full_like(l, NEG_INF), l], dim=3).reshape(B, H, Tp)
        parts.append((o, l))
    out, lse = merge_lse(parts)
    return out[:, :, :T].to(q.dtype), lse[:, :, :T].to(wide_dtype(q))


@register_layer("hyper")
class HyperAttention(QKVLayer):
    """HyperAttention: sortLSH block-diagonal + sampled residual attention layer (HyperAttention:
    Long-context Attention in Near-Linear Time, arXiv 2310.05869).

    ``x [B, T, dim] -> [B, T, dim]``: q/k/v projections, ``hyper_attention`` per head, output
    projection. Hyper-parameters are the authors' defaults except ``assign`` (None: ``"window"``
    when causal, so the layer never reads later tokens; ``"rank"`` is the paper's block assignment,
    see the module docstring); ``seed`` fixes the LSH hyperplanes
    (a buffer, saved with the layer). The residual sample is redrawn at every forward (the global
    RNG). At training lengths below ``min_seq_len`` the causal layer is exact attention: the
    ``mqar`` preset lowers ``min_seq_len``/``block_size``/``sample_size`` so that the
    approximation is exercised at sequence 256-512.
    """

    paper = "HyperAttention: Long-context Attention in Near-Linear Time (arXiv 2310.05869)"
    kind = "approx"
    content_based = True
    presets = {"default": {}, "mqar": {"block_size": 32, "sample_size": 32, "min_seq_len": 64}}

    def __init__(self, dim: int, heads: int, causal: bool = True, lsh_num_projs: int = 7, block_size: int = 256,
                 sample_size: int = 256, min_seq_len: int = 4096, assign: Optional[str] = None, seed: int = 0,
                 bias: bool = False):
        super().__init__()
        self._init_qkv(dim, heads, causal, bias)
        check_hyper_config(lsh_num_projs, block_size, sample_size, min_seq_len)
        check_int("seed", seed, 0)
        if assign is not None and assign not in ASSIGN:
            raise ValueError(f"assign: expected one of {ASSIGN} or None, got {assign!r}")
        self.assign = assign if assign is not None else ("window" if causal else "rank")
        self.block_size, self.sample_size, self.min_seq_len = block_size, sample_size, min_seq_len
        self.register_buffer("proj", lsh_projections(self.head_dim, lsh_num_projs, seed))
        self.last_stats: dict = {}

    @classmethod
    def fidelity_grid(cls, D: int, seed: int = 0) -> list[dict]:
        """fidelity_grid: the core's entries of the fidelity grid (``eval.approx_quality``) for head width
        ``D``: causal ``hyper_attention`` at the ``HYPER_GRID`` budgets (method: the registered name, and
        its ``-window`` row for ``assign="window"``), hyperplanes ``lsh_projections(D, 7, seed)``, residual
        sample from a generator seeded with ``seed`` at every call; the exact part is the same call with
        no sample (leaves + sorted diagonal blocks)."""
        check_int("D", D, 1)
        check_int("seed", seed, 0)
        hp = lsh_projections(D, 7, seed)
        grid = []
        for assign, suffix in (("rank", ""), ("window", "-window")):
            for M, b, m in HYPER_GRID[assign]:
                def h(q, k, v, st, M=M, b=b, m=m, sample=None, assign=assign):
                    g = torch.Generator(device=q.device).manual_seed(seed)
                    return hyper_attention(q, k, v, proj=hp, causal=True, block_size=b, min_seq_len=M, assign=assign,
                                           sample_size=m if sample is None else sample, generator=g, stats=st)
                grid.append(grid_entry(cls.name + suffix, f"min_seq_len={M},block={b},sample={m}", h,
                                       lambda q, k, v, h=h: h(q, k, v, None, sample=0)[1]))
        return grid

    def attend(self, q, k, v):
        """``(out, lse)`` of HyperAttention on q/k/v ``[B, heads, T, head_dim]``."""
        self.last_stats = {}
        return hyper_attention(q, k, v, proj=self.proj, causal=self.causal, block_size=self.block_size,
                               sample_size=self.sample_size, min_seq_len=self.min_seq_len, stats=self.last_stats,
                               assign=self.assign)

    def cost(self, T: int) -> dict:
        """``{"density", "flops"}`` of one forward over ``T`` tokens, counted by running the core's
        pair counter on a zero input of one head (the counts do not depend on the values)."""
        check_int("T", T, 1)
        st: dict = {}
        z = torch.zeros(1, 1, T, self.head_dim)
        hyper_attention(z, z, z, proj=self.proj.cpu(), causal=self.causal, block_size=self.block_size,
                        sample_size=self.sample_size, min_seq_len=self.min_seq_len, stats=st, assign=self.assign)
        full = T * (T + 1) / 2 if self.causal else float(T * T)
        return {"density": st["pairs"] / full, "flops": 4.0 * st["pairs"] * self.dim}
