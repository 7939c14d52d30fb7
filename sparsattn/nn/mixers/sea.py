"""sea: SEA: an attention matrix estimated at a fixed compressed width by linear (Performer)
attention, top-k selection on it, exact sparse attention on the selection through the block-sparse
kernel, and distillation of the estimator from dense attention (SEA: Sparse Linear Attention with
Estimated Attention Mask, arXiv 2310.01777).

``sea_attention(q, k, v, ...)`` is the core on ``[B, H, T, D]`` returning ``(out, lse)`` (and the
estimate with ``return_estimate``):

1. compressed estimate: key ``j`` belongs to compressed column ``floor(j * K_p / T)`` of a fixed
   width ``K_p = predictor_length``. Performer linear attention of q on k with the one-hot column
   of each key as its value (SEA's identity-like value) gives, per query, the estimated attention
   mass of every column (a row of the compressed ``T x K_p`` matrix; causal prefix sums when
   causal). The sums are kept in log scale (``_approx_logfavor.log_linear_attention``: a stabiliser
   per query row and per feature, float32 under autocast): with Performer's one key stabiliser per
   head, large-norm q/k (projections x16 at the MQAR preset, logits ~400) left 5.1-6.5% of the float32
   causal rows with an all-zero estimate (9.3-11.5% under bf16 autocast), and the exclusive prefix sums
   cancelled, giving float64 estimates far outside [0, 1] (measured 2026-12-05). An optional learned
   ``decoder`` refines its log (the paper's MLP + CNN decoder);
2. top-k: the compressed rows are averaged over each query block of ``block_size`` rows, and the
   ``top_k`` columns with most estimated mass are kept per query block;
3. resize: the kept columns are mapped to the key blocks that contain their keys (nearest
   interpolation from ``K_p`` to the real length, at block granularity); the diagonal block is
   always kept, so every query has a key;
4. exact softmax on that ``BlockPattern`` through ``sparsattn.nn.base.attend`` (the block-sparse
   kernel, or its reference on the CPU), which gives ``(out, lse)``.

The ``sea`` layer adds the paper's output mix (``mix=True``: ``g * sparse + (1 - g) * mean of the
values so far``, with a learned per-token, per-head gate ``g``, SEA's ``output_method`` "mix" with
its causal average context) and the distillation loss in ``extra_loss()``: KL(teacher || estimate)
x 0.1 + MSE(estimate, teacher) on the compressed rows (the weights of the authors' code), the
teacher being dense causal attention of the layer's own (detached) q/k, pooled into the ``K_p``
columns, on ``distill_rows`` random query rows per forward (bounded cost).

Defaults: ``top_k=7, predictor_length=128`` (the authors' config defaults), Performer features
``int(head_dim * ln(head_dim) / performer_nb_factor)`` with ``performer_nb_factor=1``. With
``top_k >= predictor_length`` every block is kept: exact attention.

Differences from the paper / authors' code (``gmlwns2000/sea-attention``, read, not copied): the
selection is per query block (the kernel's unit), not per query row (the causal *layer* selects a
block's keys with the estimates of the previous query block's rows, ``pool="previous"``: a block's own
rows include later tokens, so a causal layer would read the future through the selection; the core
and the measurements default to the block's own rows, ``pool="block"``), and the mask is a union of
key blocks, not a per-row CSR mask of exactly ``k`` resized columns; the decoder is a small MLP on
the log-estimate (no CNN); the estimator reads detached q/k (distillation trains only the
decoder); the teacher is the layer's own dense attention (the paper distils from a pretrained
model's attention); no LoRA.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ... import patterns as _patterns
from ..base import attend, register_layer
from ..layers._qkv import QKVLayer, check_int, check_pow2
from ._approx_common import add_stat, autocast_off, cdiv, check_qkv, check_scale, grid_entry
from ._approx_logfavor import log_linear_attention
from ._approx_performer import favor_exponents, orthogonal_features

__all__ = ["sea_attention", "SEA", "column_of_key", "POOLS", "SEA_GRID"]

POOLS = ("block", "previous")
#: the fidelity grid's budgets (``SEA.fidelity_grid``): ``top_k`` per pool (the paper's rule at four
#: budgets, the causal-safe ``"previous"`` at one), at ``predictor_length=128, block_size=64``
SEA_GRID = {"block": (2, 4, 8, 16), "previous": (4,)}


def column_of_key(T: int, width: int, device=None) -> torch.Tensor:
    """Compressed column ``floor(j * width / T)`` of each key ``j < T`` (int64 ``[T]``)."""
    return torch.arange(T, device=device) * width // T


def _estimate(q, k, features, scale, width, causal, chunk):
    """Per-query estimated attention mass of each compressed column, ``[B, H, T, width]`` in
    ``wide_dtype`` (rows sum to 1): Performer linear attention of the detached q on k with one-hot
    column values, in log scale (``_approx_logfavor.log_linear_attention``: a stabiliser per query row
    and per feature, so every row's normaliser is at least ``1/m``; Performer's one key stabiliser
    per head let causal rows' normalisers underflow to 0 with large-norm q/k, leaving all-zero rows),
    float32 under autocast."""
    B, H, T, _ = q.shape
    with autocast_off(q):
        w = features.to(q.device)
        a = favor_exponents(q.detach(), w, scale)
        b = favor_exponents(k.detach(), w, scale)
        onehot = torch.nn.functional.one_hot(column_of_key(T, width, q.device), width).to(a.dtype)
        num, den, _ = log_linear_attention(a, b, onehot.expand(B, H, T, width), causal=causal, chunk=chunk)
        ok = den > 0  # always, up to non-finite inputs (den >= 1 / m)
        return torch.where(ok[..., None], num / torch.where(ok, den, torch.ones_like(den))[..., None],
                           torch.zeros_like(num))


def _select_blocks(logits, T, block_size, top_k, pool):
    """Bool ``[B, H, nq, n_key_blocks]``: the key blocks of each query block (``nq = ceil(T /
    block_size)``) from the compressed estimate's ``logits [B, H, T, K_p]``: softmax per row, summed
    over the query block's rows (``pool="block"``) or the previous block's (``"previous"``; block 0
    then has no estimate), the ``top_k`` columns with most mass, the key blocks holding their keys,
    plus the diagonal block."""
    B, H, _, W = logits.shape
    nq = cdiv(T, block_size)
    probs = torch.softmax(logits.detach(), -1)
    pad = nq * block_size - T
    pooled = torch.nn.functional.pad(probs, (0, 0, 0, pad)).reshape(B, H, nq, block_size, W).sum(3)
    if pool == "previous":  # block r selects with the rows of block r - 1 (all earlier than its own rows)
        pooled = torch.nn.functional.pad(pooled, (0, 0, 1, 0))[:, :, :nq]
    kk = min(top_k, W)
    cols = torch.zeros_like(pooled, dtype=torch.bool).scatter_(-1, pooled.topk(kk, dim=-1).indices, True)
    key_block = torch.arange(T, device=logits.device) // block_size
    overlap = torch.zeros(nq, W, device=logits.device)
    overlap[key_block, column_of_key(T, W, logits.device)] = 1.0  # key block b holds keys of column c
    blocks = torch.matmul(cols.float(), overlap.T) > 0  # [B, H, nq, n_key_blocks]
    return blocks | torch.eye(nq, dtype=torch.bool, device=logits.device)


def sea_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, features: torch.Tensor, causal: bool = True,
                  scale: Optional[float] = None, top_k: int = 7, predictor_length: int = 128, block_size: int = 64,
                  decoder: Optional[nn.Module] = None, chunk: int = 64, stats: Optional[dict] = None,
                  return_estimate: bool = False, pool: str = "block"):
    """sea_attention: SEA sparse attention on an estimated mask (arXiv 2310.01777).

    Args:
        q, k, v: ``[B, H, T, D]`` (self-attention).
        features: Performer directions ``[m, D]`` of the estimator.
        top_k: compressed columns kept per query block; ``predictor_length``: compressed width K_p.
        block_size: query/key block of the pattern (a power of two >= 16).
        decoder: optional module mapping the log-estimate ``[..., K_p]`` to a correction of it.
        stats: optional dict; adds ``pairs`` (exact q-k pairs of the pattern) and ``lowrank``
            (estimator work in key-pair equivalents: ``m * K_p / D`` per query).
        return_estimate: also return the logits of the compressed estimate ``[B, H, T, K_p]``.
        pool: "block" (a query block selects with the estimates of its own rows) or "previous" (with
            those of the previous query block: the selection then never depends on later tokens).
    Returns:
        ``(out [B, H, T, Dv], lse [B, H, T] float32)`` (+ logits).
    """
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    check_int("top_k", top_k, 1)
    check_int("predictor_length", predictor_length, 1)
    check_pow2("block_size", block_size, 16)
    check_int("chunk", chunk, 1)
    if pool not in POOLS:
        raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
    B, H, T, D = q.shape
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != D:
        raise ValueError(f"features: expected Performer directions [m, {D}], got {tuple(getattr(features, 'shape', ()))}")
    W = predictor_length
    est = _estimate(q, k, features, scale, W, causal, chunk)
    logits = torch.log(est.float().clamp_min(1e-6))
    if decoder is not None:
        logits = logits + decoder(logits)
    add_stat(stats, "lowrank", B * H * T * features.shape[0] * W / D)
    blocks = _select_blocks(logits, T, block_size, top_k, pool)  # top-k columns per query block -> key blocks
    pattern = _patterns.from_block_mask(blocks, block_size=block_size, q_len=T, causal=causal)
    out, lse = attend(q, k, v, pattern, causal=causal, scale=scale, return_lse=True)
    full = T * (T + 1) / 2 if causal else float(T * T)
    add_stat(stats, "pairs", B * H * pattern.density * full)
    if return_estimate:
        return out, lse, logits
    return out, lse


class _Decoder(nn.Module):
    """Residual MLP on the log-estimate ``[..., K_p]`` (last layer zero-initialised: starts as the
    identity, i.e. the plain Performer estimate)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_layer("sea")
class SEA(QKVLayer):
    """SEA: estimated-mask sparse attention layer with distillation (SEA: Sparse Linear Attention
    with Estimated Attention Mask, arXiv 2310.01777).

    ``x [B, T, dim] -> [B, T, dim]``; see the module docstring (``pool`` None: ``"previous"`` when
    causal). ``extra_loss()`` returns the
    distillation loss of the last forward (``distill_weight`` times it; None when
    ``distill_weight == 0`` or in eval mode).
    """

    paper = "SEA: Sparse Linear Attention with Estimated Attention Mask (arXiv 2310.01777)"
    kind = "approx"
    content_based = True
    causal_modes = (True, False)
    presets = {"default": {}, "mqar": {"top_k": 4, "predictor_length": 32, "block_size": 16}}

    def __init__(self, dim: int, heads: int, causal: bool = True, top_k: int = 7, predictor_length: int = 128,
                 block_size: int = 64, performer_nb_factor: float = 1.0, mix: bool = True, distill_rows: int = 128,
                 distill_weight: float = 1.0, pool: Optional[str] = None, seed: int = 0, bias: bool = False):
        super().__init__()
        self._init_qkv(dim, heads, causal, bias)
        check_int("top_k", top_k, 1)
        check_int("predictor_length", predictor_length, 1)
        check_pow2("block_size", block_size, 16)
        check_int("distill_rows", distill_rows, 1)
        check_int("seed", seed, 0)
        if isinstance(performer_nb_factor, bool) or not isinstance(performer_nb_factor, (int, float)) \
                or not performer_nb_factor > 0:
            raise ValueError(f"performer_nb_factor: expected a positive number, got {performer_nb_factor!r}")
        if isinstance(distill_weight, bool) or not isinstance(distill_weight, (int, float)) or not distill_weight >= 0:
            raise ValueError(f"distill_weight: expected a number >= 0, got {distill_weight!r}")
        if pool is not None and pool not in POOLS:
            raise ValueError(f"pool: expected one of {POOLS} or None, got {pool!r}")
        self.pool = pool if pool is not None else ("previous" if causal else "block")
        if not isinstance(mix, bool):
            raise ValueError(f"mix: expected a bool, got {mix!r}")
        d = self.head_dim
        m = max(1, int(d * math.log(max(d, 2)) / performer_nb_factor))
        self.top_k, self.predictor_length, self.block_size = top_k, predictor_length, block_size
        self.mix, self.distill_rows, self.distill_weight = mix, distill_rows, float(distill_weight)
        self.register_buffer("features", orthogonal_features(m, d, seed))
        self.decoder = _Decoder(predictor_length, 2 * d)
        self.gate = nn.Linear(dim, heads) if mix else None
        if mix:
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, 2.0)
        self._loss: Optional[torch.Tensor] = None
        self.last_stats: dict = {}

    @classmethod
    def fidelity_grid(cls, D: int, seed: int = 0) -> list[dict]:
        """fidelity_grid: the core's entries of the fidelity grid (``eval.approx_quality``) for head width
        ``D``: causal ``sea_attention`` without the trained decoder, at the ``SEA_GRID`` budgets (method:
        the registered name, its ``-previous`` row for ``pool="previous"``), Performer's
        ``int(D * ln D)`` features ``orthogonal_features(m, D, seed)``; the exact part is the selected
        blocks (the core's lse)."""
        check_int("D", D, 1)
        check_int("seed", seed, 0)
        sea_f = orthogonal_features(int(D * math.log(D)), D, seed)
        grid = []
        for pool, suffix in (("block", ""), ("previous", "-previous")):
            for kk in SEA_GRID[pool]:
                def se(q, k, v, st, kk=kk, pool=pool):
                    return sea_attention(q, k, v, features=sea_f, causal=True, top_k=kk, predictor_length=128,
                                         block_size=64, stats=st, pool=pool)
                grid.append(grid_entry(cls.name + suffix, f"top_k={kk},K_p=128,block=64", se,
                                       lambda q, k, v, se=se: se(q, k, v, None)[1]))
        return grid

    def attend(self, q, k, v, return_estimate: bool = False):
        """``(out, lse)`` of SEA's sparse part on q/k/v ``[B, heads, T, head_dim]`` (+ estimate logits)."""
        self.last_stats = {}
        return sea_attention(q, k, v, features=self.features, causal=self.causal, top_k=self.top_k,
                             predictor_length=self.predictor_length, block_size=self.block_size,
                             decoder=self.decoder, stats=self.last_stats, return_estimate=return_estimate,
                             pool=self.pool)

    def _distill(self, q, k, logits):
        """0.1 KL(teacher || estimate) + MSE on ``distill_rows`` random rows (teacher: dense attention
        of the detached q/k pooled into the compressed columns)."""
        B, H, T, D = q.shape
        W = self.predictor_length
        rows = torch.randperm(T, device=q.device)[:min(self.distill_rows, T)]
        s = torch.matmul(q.detach().float()[:, :, rows], k.detach().float().transpose(-1, -2)) / math.sqrt(D)
        if self.causal:
            s = s.masked_fill(torch.arange(T, device=q.device)[None, :] > rows[:, None], float("-inf"))
        onehot = torch.nn.functional.one_hot(column_of_key(T, W, q.device), W).float()
        teacher = torch.matmul(torch.softmax(s, -1), onehot)  # [B, H, R, W]
        logp = torch.log_softmax(logits[:, :, rows], -1)
        kl = (teacher * (torch.log(teacher.clamp_min(1e-12)) - logp)).sum(-1).mean()
        mse = ((logp.exp() - teacher) ** 2).mean()
        return 0.1 * kl + mse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SEA attention of ``x [B, T, dim]``; stores the distillation loss for ``extra_loss()``."""
        self.check_x(x)
        q, k, v = self.split(x)
        out, _, logits = self.attend(q, k, v, return_estimate=True)
        if self.mix:
            T = x.shape[1]
            if self.causal:
                avg = torch.cumsum(v.float(), 2) / torch.arange(1, T + 1, device=x.device, dtype=torch.float32)[:, None]
            else:
                avg = v.float().mean(2, keepdim=True).expand_as(v)
            g = torch.sigmoid(self.gate(x)).transpose(1, 2)[..., None]  # [B, H, T, 1]
            out = (g * out.float() + (1 - g) * avg).to(out.dtype)
        self._loss = (self.distill_weight * self._distill(q, k, logits)
                      if self.training and self.distill_weight > 0 else None)
        return self.merge(out)

    def extra_loss(self) -> Optional[torch.Tensor]:
        """The distillation loss of the last forward (None in eval mode or with ``distill_weight=0``)."""
        return self._loss

    def cost(self, T: int) -> dict:
        """``{"density", "flops"}``: the density of the selection is input-dependent, so the cost
        is the budget's upper bound (``top_k`` columns -> key blocks, plus the diagonal block) plus the
        estimator (``m * K_p / head_dim`` key-pair equivalents per query)."""
        check_int("T", T, 1)
        W = self.predictor_length
        keys_per_col = cdiv(T, W)
        blocks = min(cdiv(T, self.block_size), min(self.top_k, W) * (cdiv(keys_per_col, self.block_size) + 1) + 1)
        full = T * (T + 1) / 2 if self.causal else float(T * T)
        pairs = min(full, T * blocks * self.block_size) + T * self.features.shape[0] * W / self.head_dim
        return {"density": min(1.0, pairs / full), "flops": 4.0 * pairs * self.dim}
