"""sparsifiner: a low-rank connectivity predictor chooses each query's top-k keys, sparse attention
runs on that mask (Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
Transformers, Wei et al., arXiv 2303.13755)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Layer, attend, register_layer
from ._util import QKVOut, check_bool, check_dim_heads, check_float, check_input, check_int, mask_pattern


@register_layer("sparsifiner")
class SparsifinerAttention(Layer):
    """SparsifinerAttention: per instance, a cheap low-rank attention estimate picks the top
    ``keep_rate * T`` keys of every query; exact attention runs on that unstructured mask through
    the block-sparse kernel; ``extra_loss()`` distils the estimate from the layer's own dense
    attention (Sparsifiner, arXiv 2303.13755).

    ``x [B, T, dim] -> [B, T, dim]``; ``layout`` is ``"1d"``: 2-D inputs ``[B, H, W, dim]`` are
    accepted too and read row-major (the paper's ViT patches are a flattened grid as well).

    Predictor (per head, the authors' ``MaskPredictor``):
      1. channel reduction ``q' = q W_cq``, ``k' = k W_ck`` to ``head_dim / reduce_c`` (shared by
         heads, with bias);
      2. token reduction ``k'' = k'^T P_n``, ``P_n [max_len, max_len / reduce_n]`` learned (rows
         ``[:T]`` used at length ``T``);
      3. basis coefficients ``softmax(q' k'' * heads**-0.5)`` (the code's scale);
      4. for the mask: keep the ``basis_topk`` largest coefficients per row, multiply by the basis
         ``P_back^T`` whose entries with ``|.| < basis_threshold`` are zeroed; the connectivity
         mask is the top ``ceil(keep_rate * T)`` entries per row, detached;
      5. for the distillation: the unthresholded ``approx = coef @ P_back^T`` against the dense
         attention probabilities: ``extra_loss = distill_weight * sum_j (approx - attn)^2``,
         averaged over rows (the code's attention self-distillation, MSE).

    Causal variant (``causal=True``, for sequences): the token reduction mixes every key,
    future ones included, into every row's estimate, so it is dropped: the estimate is
    ``softmax(q' k'^T * scale)`` over the keys up to the query (channel-reduced, O(T^2 d/reduce_c)),
    the mask its top ``ceil(keep_rate * T)`` entries among the allowed keys (all of them for the
    first rows), and the distillation compares it with the causal dense attention.

    Hyper-parameters (the authors' default config): ``keep_rate=0.25``, ``reduce_n=6``,
    ``reduce_c=2``, ``basis_topk=8``, ``basis_threshold=2e-2``; ``max_len=1024`` (the ``P_n``
    rows: the longest sequence), ``distill_weight=1.0``, ``distill_rows=256`` (query rows sampled
    per step for the distillation; 0 = all).

    Differences from the paper kept: no CLS token (every row is sparse; the paper keeps the CLS row
    dense); training is one phase (task loss + distillation every step, the teacher being the
    layer's own dense attention, detached so that only the predictor learns from it), not the
    paper's 5 epochs of reconstruction with dense attention followed by 45 epochs with a frozen
    pretrained teacher; the distillation sums over keys and averages over sampled rows (the code
    sums everything); no token pruning.
    """

    paper = ("Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers, "
             "arXiv 2303.13755")
    kind = "sparse"
    layout = "1d"
    causal_modes = (False, True)
    content_based = True
    presets = {"default": {}, "mqar": {"causal": True, "keep_rate": 0.25, "max_len": 512},
               "pathfinder": {"keep_rate": 0.25, "max_len": 1024}}

    def __init__(self, dim: int, heads: int, keep_rate: float = 0.25, reduce_n: int = 6, reduce_c: int = 2,
                 basis_topk: int = 8, basis_threshold: float = 2e-2, max_len: int = 1024,
                 distill_weight: float = 1.0, distill_rows: int = 256, causal: bool = False):
        super().__init__()
        check_dim_heads(dim, heads)
        check_float("keep_rate", keep_rate, 0.0, 1.0, lo_open=True)
        check_int("reduce_n", reduce_n)
        check_int("reduce_c", reduce_c)
        check_int("basis_topk", basis_topk)
        check_float("basis_threshold", basis_threshold, 0.0, 1e6)
        check_int("max_len", max_len)
        check_float("distill_weight", distill_weight, 0.0, 1e6)
        check_int("distill_rows", distill_rows, 0)
        check_bool("causal", causal)
        hd = dim // heads
        if hd // reduce_c < 1:
            raise ValueError(f"reduce_c: expected at most head_dim={hd}, got {reduce_c}")
        if max_len // reduce_n < 1:
            raise ValueError(f"reduce_n: expected at most max_len={max_len}, got {reduce_n}")
        self.dim, self.heads, self.head_dim = dim, heads, hd
        self.keep_rate, self.basis_topk, self.basis_threshold = keep_rate, basis_topk, basis_threshold
        self.max_len, self.distill_weight, self.distill_rows, self.causal = max_len, distill_weight, distill_rows, causal
        self.scale = hd ** -0.5
        self.pred_scale = heads ** -0.5
        self.proj = QKVOut(dim, heads)
        rc = hd // reduce_c
        self.proj_c_q = nn.Linear(hd, rc)
        self.proj_c_k = nn.Linear(hd, rc)
        n_down = max_len // reduce_n
        self.proj_n = nn.Parameter(torch.randn(max_len, n_down) * 0.02)
        self.proj_back_n = nn.Parameter(torch.randn(max_len, n_down) * 0.02)
        self._aux: Optional[torch.Tensor] = None

    def budget(self, T: int) -> int:
        """Keys kept per query row at length ``T``."""
        return min(T, math.ceil(self.keep_rate * T))

    def predict(self, q: torch.Tensor, k: torch.Tensor):
        """The predictor: q/k ``[B, h, T, d]`` -> (mask bool ``[B, h, T, T]`` detached, approx
        ``[B, h, T, T]`` differentiable estimate used by the distillation)."""
        B, h, T, d = q.shape
        qc, kc = self.proj_c_q(q), self.proj_c_k(k)
        kb = self.budget(T)
        if self.causal:
            s = (qc @ kc.transpose(-1, -2)) * self.pred_scale
            allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            s = s.masked_fill(~allowed, float("-inf"))
            approx = s.float().softmax(-1)
            with torch.no_grad():
                top = s.detach().topk(kb, dim=-1)
                mask = torch.zeros(B, h, T, T, dtype=torch.bool, device=q.device)
                mask.scatter_(-1, top.indices, torch.isfinite(top.values))
            return mask, approx
        Pn, Pb = self.proj_n[:T], self.proj_back_n[:T]
        k2 = kc.transpose(-1, -2) @ Pn.to(kc.dtype)                       # [B, h, rc, n_down]
        coef = ((qc @ k2) * self.pred_scale).float().softmax(-1)          # [B, h, T, n_down]
        approx = coef @ Pb.t().float()                                    # [B, h, T, T]
        with torch.no_grad():
            ck = min(self.basis_topk, coef.shape[-1])
            cv, ci = coef.detach().topk(ck, dim=-1)
            sparse_coef = torch.zeros_like(coef).scatter_(-1, ci, cv)
            basis = Pb.detach().t().float()
            basis = torch.where(basis.abs() >= self.basis_threshold, basis.abs(), torch.zeros_like(basis))
            score = sparse_coef @ basis
            idx = score.topk(kb, dim=-1).indices
            mask = torch.zeros(B, h, T, T, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
        return mask, approx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, dim]`` (or ``[B, H, W, dim]``, read row-major) -> same shape."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
            raise ValueError(f"x: expected a tensor [B, T, {self.dim}] or [B, H, W, {self.dim}], "
                             f"got {getattr(x, 'shape', type(x))}")
        check_input(x, x.dim(), self.dim, "[B, T, dim] or [B, H, W, dim]")
        B = x.shape[0]
        xf = x.reshape(B, -1, self.dim)
        T = xf.shape[1]
        if T > self.max_len:
            raise ValueError(f"x: {T} tokens exceed max_len={self.max_len} (the predictor's P_n rows)")
        q, k, v = self.proj.split(xf)
        mask, approx = self.predict(q, k)
        o = attend(q, k, v, mask_pattern(mask, 64 if T >= 64 else 16), scale=self.scale)
        self._aux = self._distill(q, k, approx) if self.training and self.distill_weight > 0 else None
        return self.proj.merge(o).view(x.shape)

    def _distill(self, q, k, approx):
        T = q.shape[2]
        rows = None
        if self.distill_rows and self.distill_rows < T:
            rows = torch.randperm(T, device=q.device)[: self.distill_rows]
            q, approx = q[:, :, rows], approx[:, :, rows]
        with torch.no_grad():
            s = (q.float() @ k.float().transpose(-1, -2)) * self.scale
            if self.causal:
                i = (torch.arange(T, device=q.device) if rows is None else rows)[:, None]
                s = s.masked_fill(torch.arange(T, device=q.device)[None, :] > i, float("-inf"))
            teacher = s.softmax(-1)
        return self.distill_weight * (approx - teacher).pow(2).sum(-1).mean()

    def extra_loss(self) -> Optional[torch.Tensor]:
        """The distillation loss of the last training forward (None in eval mode)."""
        return self._aux

    def cost(self, T: int) -> dict:
        """Attention cost at ``T`` tokens: density = kept keys / all (or causal) pairs; FLOPs of the
        sparse attention plus the predictor."""
        check_int("T", T)
        kb = self.budget(T)
        rc = self.proj_c_q.out_features
        if self.causal:
            t = torch.arange(T, dtype=torch.float64)
            pairs = float(torch.clamp(t + 1, max=kb).sum())
            total = T * (T + 1) / 2
            pred = 2.0 * T * (T + 1) / 2 * rc
        else:
            pairs, total = float(T * kb), float(T * T)
            n_down = self.proj_n.shape[1]
            pred = 2.0 * (T * rc * n_down * 2 + T * n_down * T)
        return {"density": pairs / total, "flops": 4.0 * pairs * self.dim + pred * self.heads}
