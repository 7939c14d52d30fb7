"""aaren: attention as a many-to-many RNN computed with a parallel prefix scan
(Attention as an RNN, Feng et al., arXiv 2405.13956)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..base import Layer, register_layer
from ._mixer_util import check_bool, check_common, check_x, cost_vs_dense, heads_merge, heads_split


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def aaren_scan(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """aaren_scan: softmax attention of one query over every prefix, by a parallel prefix scan of
    ``(m, u, w)`` = (running max, ``sum e^(s-m)``, ``sum e^(s-m) v``) (Attention as an RNN,
    arXiv 2405.13956).

    s ``[..., T]`` scores, v ``[..., T, E]`` values -> ``(o [..., T, E], lse [..., T])`` with
    ``o_t = sum_{i<=t} softmax(s_{:t})_i v_i`` and ``lse_t = logsumexp(s_{:t})``. Hillis-Steele
    scan: ``ceil(log2 T)`` rounds of the associative combine
    ``m = max(m_a, m_b)``, ``u = u_a e^(m_a-m) + u_b e^(m_b-m)``, ``w = w_a e^(m_a-m) + w_b e^(m_b-m)``,
    each over all positions at once (O(T log T) work, O(log T) depth). Every exponent is <= 0, so
    nothing overflows; computed in float32 (float64 for float64 inputs), returned in v's dtype
    (lse in float32/float64). Differentiable by autograd.
    """
    if s.shape != v.shape[:-1]:
        raise ValueError(f"s: expected shape {tuple(v.shape[:-1])} (v without its last dim), got {tuple(s.shape)}")
    acc = _acc(v)
    m = s.to(acc)
    w = v.to(acc)
    u = torch.ones_like(m)
    T = s.shape[-1]
    d = 1
    while d < T:
        m_a = torch.nn.functional.pad(m[..., :-d], (d, 0), value=float("-inf"))
        u_a = torch.nn.functional.pad(u[..., :-d], (d, 0))
        w_a = torch.nn.functional.pad(w[..., :-d, :], (0, 0, d, 0))
        m_new = torch.maximum(m, m_a)
        ea, eb = torch.exp(m_a - m_new), torch.exp(m - m_new)
        u = u_a * ea + u * eb
        w = w_a * ea[..., None] + w * eb[..., None]
        m = m_new
        d *= 2
    return (w / u[..., None]).to(v.dtype), m + torch.log(u)


def aaren_step(s_t: torch.Tensor, v_t: torch.Tensor, state=None):
    """aaren_step: one RNN update of ``(m, u, w)`` with a new score ``s_t [...]`` and value
    ``v_t [..., E]``; ``state`` None starts empty. Returns ``(o_t [..., E], lse_t [...], state)``
    (constant memory per step)."""
    acc = _acc(v_t)
    s_t, v_t = s_t.to(acc), v_t.to(acc)
    if state is None:
        m, u, w = s_t, torch.ones_like(s_t), v_t
    else:
        m0, u0, w0 = state
        m = torch.maximum(m0, s_t)
        a, b = torch.exp(m0 - m), torch.exp(s_t - m)
        u = u0 * a + b
        w = w0 * a[..., None] + v_t * b[..., None]
    return w / u[..., None], m + torch.log(u), (m, u, w)


@register_layer("aaren")
class Aaren(Layer):
    """Aaren: attention as a many-to-many RNN, one learned query per head attending over every
    prefix, computed by a parallel prefix scan (Attention as an RNN, Feng et al., arXiv 2405.13956).

    ``x [B, T, dim] -> [B, T, dim]``: ``k = x W_k``, ``v = x W_v`` split into heads; per head
    ``s_t = q_h . k_t / sqrt(d)`` with ``q_h`` a learned parameter (independent of the input);
    ``o_t = softmax(s_{1..t}) v_{1..t}`` (``aaren_scan``); ``y = W_o o``. ``forward_with_lse``
    also returns the per-head log-sum-exp ``[B, H, T]`` so the output can be merged with exact
    (sparse) attention by log-sum-exp weights. Decode: ``step`` keeps ``(m, u, w)`` per head,
    ``O(d)`` memory whatever the length.

    Hyper-parameters: ``bias`` = False (projections). The paper gives no further ones (standard
    transformer sizes, one learned query per layer and head).

    Differences from the paper: the scan is Hillis-Steele over all positions in torch (the paper
    describes a parallel prefix scan without a specific kernel; no public code was available to
    compare); the query is initialised N(0, 1/d) (unspecified in the paper); 1/sqrt(d) score
    scale. Because the query does not depend on the input, an Aaren layer cannot ask for a
    particular key: on associative recall it is expected to do poorly (measured in
    docs/approximations.md).
    """

    paper = "Attention as an RNN (Feng et al., arXiv 2405.13956)"
    kind = "mixer"
    causal_modes = (True,)
    presets = {"default": {}, "mqar": {}}

    def __init__(self, dim: int, heads: int, causal: bool = True, bias: bool = False):
        super().__init__()
        check_common(dim, heads, causal)
        check_bool("bias", bias)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.query = nn.Parameter(torch.randn(heads, self.head_dim) * self.head_dim ** -0.5)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _scores(self, x: torch.Tensor):
        k, v = self.kv_proj(x).split(self.dim, dim=-1)
        k, v = heads_split(k, self.heads), heads_split(v, self.heads)
        s = torch.einsum("bhtd,hd->bht", k, self.query.to(k.dtype)) * self.head_dim ** -0.5
        return s, v

    def forward_with_lse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [B, H, T, d], lse [B, H, T])`` of the heads before the output projection."""
        check_x(x, self.dim)
        s, v = self._scores(x)
        return aaren_scan(s, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Parallel (scan) form over ``x [B, T, dim]``."""
        o, _ = self.forward_with_lse(x)
        return self.out_proj(heads_merge(o))

    def step(self, x_t: torch.Tensor, state: Optional[tuple] = None) -> tuple[torch.Tensor, tuple]:
        """Decode one token ``x_t [B, dim]`` with the ``(m, u, w)`` state of earlier tokens (None at
        the start) -> ``(y_t [B, dim], new state)``."""
        x3 = x_t[:, None] if x_t.dim() == 2 else x_t
        check_x(x3, self.dim)
        if x3.shape[1] != 1:
            raise ValueError(f"x_t: expected one token [B, dim] or [B, 1, dim], got {tuple(x_t.shape)}")
        s, v = self._scores(x3)
        o, _, state = aaren_step(s[..., 0], v[..., 0, :], state)
        return self.out_proj(heads_merge(o[:, :, None].to(x3.dtype)))[:, 0], state

    def cost(self, T: int) -> dict[str, float]:
        """FLOPs: scores ``2 T dim`` + ``ceil(log2 T)`` scan rounds of about ``4 T dim`` each."""
        rounds = max(0, (T - 1).bit_length()) if isinstance(T, int) and not isinstance(T, bool) and T > 0 else 0
        return cost_vs_dense(2.0 * T * self.dim + 4.0 * T * self.dim * rounds, T, self.dim)


__all__ = ["Aaren", "aaren_scan", "aaren_step"]
