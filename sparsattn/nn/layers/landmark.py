"""landmark: landmark tokens per block, grouped softmax, top-k block retrieval (Landmark Attention, arXiv 2305.16300)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ... import patterns
from ..base import attend, register_layer
from ._qkv import QKVLayer, check_int

NEG = float("-inf")


def grouped_softmax_attention(q, k, v, lk, block: int, scale: float, top_k=None):
    """grouped_softmax_attention: Landmark Attention's grouped softmax in plain torch (the reference
    and the training path; arXiv 2305.16300).

    q, k, v ``[B, H, T, D]``; lk ``[B, H, nb, D]`` landmark keys of the ``nb = T // block`` complete
    blocks. Query i (block b) shares one softmax between the keys of its own block up to i and the
    landmarks of blocks ``j < b``; landmark j's probability is spread over block j's keys by a
    softmax inside that block. ``top_k``: keep only the k highest landmarks of each query (the
    retrieval of inference). Returns ``[B, H, T, D]`` (float32).
    """
    B, H, T, D = q.shape
    nb = lk.shape[2]
    qf, kf, vf = q.float(), k.float(), v.float()
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale                      # [B,H,T,T]
    pos = torch.arange(T, device=q.device)
    bi = pos // block
    local = (bi[:, None] == bi[None, :]) & (pos[None, :] <= pos[:, None])
    if nb == 0:
        return torch.softmax(s.masked_fill(~local, NEG), -1) @ vf
    lsc = torch.matmul(qf, lk.float().transpose(-1, -2)) * scale             # [B,H,T,nb]
    earlier = torch.arange(nb, device=q.device)[None, :] < bi[:, None]       # [T, nb]
    lsc = lsc.masked_fill(~earlier, NEG)
    if top_k is not None and top_k < nb:
        kth = lsc.topk(top_k, dim=-1).values[..., -1:]
        lsc = lsc.masked_fill(lsc < kth, NEG)
    s_loc = s.masked_fill(~local, NEG)
    logz = torch.logsumexp(torch.cat([s_loc, lsc], -1), -1, keepdim=True)   # [B,H,T,1]
    sb = s[..., :nb * block].reshape(B, H, T, nb, block)
    lse_in = torch.logsumexp(sb, -1)                                          # [B,H,T,nb]
    logw_far = (lsc - lse_in)[..., None] + sb                                 # [B,H,T,nb,block]
    logw = torch.full_like(s, NEG)
    logw[..., :nb * block] = logw_far.reshape(B, H, T, nb * block)
    logw = torch.where(local, s, logw) - logz
    return torch.exp(logw) @ vf


@register_layer("landmark")
class LandmarkAttention(QKVLayer):
    """LandmarkAttention: a landmark per block of ``block_size`` tokens stands for its block;
    training uses the grouped softmax, inference retrieves each query's ``top_k`` blocks through
    their landmarks and reads only those (Landmark Attention: Random-Access Infinite Context Length
    for Transformers, arXiv 2305.16300).

    Training (``train()``, or ``inference="grouped"``): ``grouped_softmax_attention`` over all
    earlier landmarks (plain torch, quadratic like dense training). Inference (``eval()``): the
    same grouped softmax restricted to the ``top_k`` landmarks of each query, computed through
    ``sparsattn.attention``: one call for the query's own block (causal) and one per retrieval rank
    whose per-query element mask is the retrieved block; the parts are merged by log-sum-exp with
    the landmark scores as their weights. Any length works at inference (no positional limit here).

    The landmark's representation: the paper inserts a landmark token after every block, whose
    hidden state (it attends to its block in the layers below) gives the landmark key. A layer
    cannot add tokens to the model's sequence, so here a block's landmark input is a learned
    attention-pooling of the block's inputs plus a learned landmark embedding, projected by the
    layer's key projection. Causal only; a trailing incomplete block has no landmark.

    Defaults: ``block_size=50`` (``mem_freq`` of the paper's language models), ``top_k=4`` (k = 2-4 in
    its language-modelling tables, 5 in the LLaMA test); the MQAR preset uses blocks of 16.
    """

    paper = "Landmark Attention: Random-Access Infinite Context Length for Transformers (arXiv 2305.16300)"
    kind = "sparse"
    causal_modes = (True,)
    content_based = True
    presets = {"mqar": {"block_size": 16, "top_k": 4}, "listops": {"block_size": 16, "top_k": 4}}

    def __init__(self, dim: int, heads: int, causal: bool = True, block_size: int = 50, top_k: int = 4,
                 inference: str = "retrieval", tile: int = 16, bias: bool = False):
        super().__init__()
        self._init_qkv(dim, heads, causal, bias)
        self.block_size = check_int("block_size", block_size, 2)
        self.top_k = check_int("top_k", top_k, 1)
        if inference not in ("retrieval", "grouped"):
            raise ValueError(f"inference: expected 'retrieval' or 'grouped', got {inference!r}")
        self.inference = inference
        self.tile = check_int("tile", tile, 16)
        if tile & (tile - 1):
            raise ValueError(f"tile: expected a power of two >= 16, got {tile}")
        self.pool = nn.Linear(dim, 1, bias=False)
        self.landmark = nn.Parameter(torch.randn(dim) * 0.02)
        self.last_density = None

    def landmark_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Landmark keys ``[B, heads, T // block_size, head_dim]`` of ``x [B, T, dim]``."""
        B, T, dim = x.shape
        nb = T // self.block_size
        xb = x[:, :nb * self.block_size].reshape(B, nb, self.block_size, dim)
        w = torch.softmax(self.pool(xb).float(), 2).to(x.dtype)
        h = (w * xb).sum(2) + self.landmark.to(x.dtype)
        wk = self.qkv_proj.weight[dim:2 * dim]
        bk = None if self.qkv_proj.bias is None else self.qkv_proj.bias[dim:2 * dim]
        lk = nn.functional.linear(h, wk, bk)
        return lk.view(B, nb, self.heads, self.head_dim).transpose(1, 2)

    def _retrieval(self, q, k, v, lk, scale):
        B, H, T, D = q.shape
        nb, bs = lk.shape[2], self.block_size
        pos = torch.arange(T, device=q.device)
        bi = pos // bs
        local = (bi[:, None] == bi[None, :]) & (pos[None, :] <= pos[:, None])
        p_loc = patterns.from_dense_mask(local[None, None], block_size=self.tile, causal=True)
        o_loc, lse_loc = attend(q, k, v, p_loc, causal=True, scale=scale, return_lse=True)
        outs, logws = [o_loc.float()], [lse_loc.float()]
        comp = float(local.sum()) * B * H
        if nb:
            lsc = torch.matmul(q.float(), lk.float().transpose(-1, -2)) * scale
            earlier = torch.arange(nb, device=q.device)[None, :] < bi[:, None]
            lsc = lsc.masked_fill(~earlier, NEG)
            kk = min(self.top_k, nb)
            top, idx = lsc.topk(kk, dim=-1)                                    # [B,H,T,kk]
            kb = torch.arange(T, device=q.device) // bs                         # key block of each key
            for r in range(kk):
                ok = torch.isfinite(top[..., r])                                 # [B,H,T]
                mask = (kb[None, None, None, :] == idx[..., r, None]) & ok[..., None]
                if not bool(mask.any()):
                    continue
                p = patterns.from_dense_mask(mask, block_size=self.tile, causal=True)
                o_r, _ = attend(q, k, v, p, causal=True, scale=scale, return_lse=True)
                outs.append(o_r.float())
                logws.append(torch.where(ok, top[..., r], torch.full_like(top[..., r], NEG)))
                comp += float(mask.sum())
        lw = torch.stack(logws, -1)                                             # [B,H,T,parts]
        m = lw.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(lw - m)
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
        out = sum(w[..., i, None] * outs[i] for i in range(len(outs)))
        self.last_density = comp / (B * H * T * (T + 1) / 2)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped-softmax attention (training) or top-k block retrieval (eval) of ``x [B, T, dim]``."""
        self.check_x(x)
        q, k, v = self.split(x)
        lk = self.landmark_keys(x)
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.training or self.inference == "grouped":
            out = grouped_softmax_attention(q, k, v, lk, self.block_size, scale)
        else:
            out = self._retrieval(q, k, v, lk, scale)
        return self.merge(out.to(x.dtype))

    def cost(self, T: int) -> dict:
        """Inference (retrieval) cost: own block (causal) + ``top_k`` blocks per query, and one landmark
        score per earlier block; ``train_density`` 1 (the grouped softmax reads every key)."""
        bs = self.block_size
        pairs = 0.0
        for i in range(T):
            b = i // bs
            pairs += (i - b * bs + 1) + min(self.top_k, b) * bs + b  # own block, retrieved, landmarks
        causal_pairs = T * (T + 1) / 2
        return {"density": min(1.0, pairs / causal_pairs), "flops": 4.0 * pairs * self.dim, "train_density": 1.0}
