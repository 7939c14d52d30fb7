"""lightning: TransNormerLLM's gated linear attention with decay, computed by Lightning Attention
(TransNormerLLM, arXiv 2307.14995; Lightning Attention-2, arXiv 2401.04658)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.lightning import lightning_attention
from ...kernels.lightning.reference import lightning_recurrent
from ..base import Layer, register_layer
from ._mixer_util import check_bool, check_common, check_float, check_int, check_x, cost_vs_dense, heads_merge, \
    heads_split


def alibi_slopes(heads: int) -> torch.Tensor:
    """alibi_slopes: the ALiBi head slopes (``2^(-8 (h+1) / H)`` for a power-of-two ``H``;
    otherwise the slopes of the nearest lower power of two followed by every other slope of
    twice that count), Lightning Attention-2's ``_build_slope_tensor`` rule, float32 ``[H]``."""
    check_int("heads", heads)

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads & (heads - 1) == 0:
        s = pow2(heads)
    else:
        p = 1 << (heads.bit_length() - 1)
        s = pow2(p) + pow2(2 * p)[0::2][: heads - p]
    return torch.tensor(s, dtype=torch.float32)


@register_layer("lightning")
class Lightning(Layer):
    """Lightning: TransNormerLLM's gated linear attention with per-head exponential decay,
    computed intra-block dense / inter-block recurrent (TransNormerLLM, arXiv 2307.14995;
    Lightning Attention-2, arXiv 2401.04658).

    ``x [B, T, dim] -> [B, T, dim]``:
    ``q = SiLU(x W_q)``, ``k = SiLU(x W_k)``, ``v = x W_v``, ``u = x W_u``;
    ``o_t = sum_{s<=t} lambda_h^(t-s) (q_t . k_s / sqrt(d)) v_s`` per head (the Lightning kernel:
    Triton on CUDA, forward and chunked backward; the chunked torch form on the CPU);
    ``y = W_o (SRMSNorm(o) * u)``. Decode: ``step`` carries the ``[B, H, d, d]`` state
    (constant memory per token).

    Hyper-parameters (paper defaults): ``slope_scale`` = 1.0 multiplies the ALiBi slopes
    ``s_h`` that set ``lambda_h = exp(-slope_scale * s_h)`` (Lightning Attention-2's
    ``_build_slope_tensor``; TransNormerLLM scales them per layer by ``1 - l/L``: pass that
    factor here); ``block`` = 64 tokens per tile (the paper's kernel); ``norm`` = True (the
    SRMSNorm on the output), ``gate`` = True (the output gate ``u``); ``bias`` = False.

    Differences from the papers: no LRPE-d relative positional encoding (TransNormerLLM's first
    layers' positional term; the decay alone carries position here), the SRMSNorm is over the
    whole width (not per head), ``u`` has no activation, the decay is fixed (not learned; no
    gradient through it, as in the papers), and the 1/sqrt(d) score scale is ours (TransNormerLLM
    relies on the norm; with the norm on it only changes the norm's epsilon regime). The
    activations follow the paper's equations, not a reading of the authors' code.
    """

    paper = ("TransNormerLLM (arXiv 2307.14995); Lightning Attention-2: A Free Lunch for Handling "
             "Unlimited Sequence Lengths (arXiv 2401.04658)")
    kind = "mixer"
    causal_modes = (True,)
    presets = {"default": {}, "mqar": {}}

    def __init__(self, dim: int, heads: int, causal: bool = True, slope_scale: float = 1.0, block: int = 64,
                 norm: bool = True, gate: bool = True, bias: bool = False):
        super().__init__()
        check_common(dim, heads, causal)
        check_float("slope_scale", slope_scale, 0.0)
        check_int("block", block, 16)
        if block & (block - 1):
            raise ValueError(f"block: expected a power of two >= 16, got {block}")
        for n, v in (("norm", norm), ("gate", gate), ("bias", bias)):
            check_bool(n, v)
        self.dim, self.heads, self.head_dim, self.block = dim, heads, dim // heads, block
        self.norm, self.gate = norm, gate
        self.in_proj = nn.Linear(dim, (4 if gate else 3) * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.register_buffer("log_decay", -slope_scale * alibi_slopes(heads), persistent=False)

    def _qkvu(self, x: torch.Tensor):
        y = self.in_proj(x)
        parts = y.split(self.dim, dim=-1)
        q, k, v = F.silu(parts[0]), F.silu(parts[1]), parts[2]
        u = parts[3] if self.gate else None
        return heads_split(q, self.heads), heads_split(k, self.heads), heads_split(v, self.heads), u

    def _finish(self, o: torch.Tensor, u: Optional[torch.Tensor]) -> torch.Tensor:
        o = heads_merge(o)
        if self.norm:  # SRMSNorm: x / rms(x), no weight
            of = o.float()
            o = (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + 1e-6)).to(o.dtype)
        if u is not None:
            o = o * u
        return self.out_proj(o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Parallel (chunked) form over ``x [B, T, dim]``."""
        check_x(x, self.dim)
        q, k, v, u = self._qkvu(x)
        # the Triton kernel on CUDA; on the CPU the chunked torch form (the Triton interpreter is
        # for testing the kernel, far too slow to train with)
        o = lightning_attention(q, k, v, self.log_decay.to(x.device), block=self.block,
                                backend=None if x.is_cuda else "torch")
        return self._finish(o, u)

    def step(self, x_t: torch.Tensor, state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token: ``x_t [B, dim]`` (or ``[B, 1, dim]``) and the ``[B, H, d, d]`` state of
        earlier tokens (None at the start) -> ``(y_t [B, dim], new state)``."""
        x3 = x_t[:, None] if x_t.dim() == 2 else x_t
        check_x(x3, self.dim)
        if x3.shape[1] != 1:
            raise ValueError(f"x_t: expected one token [B, dim] or [B, 1, dim], got {tuple(x_t.shape)}")
        q, k, v, u = self._qkvu(x3)
        o, state = lightning_recurrent(q, k, v, self.log_decay.to(x3.device), state=state)
        return self._finish(o, u)[:, 0], state

    def cost(self, T: int) -> dict[str, float]:
        """FLOPs of the chunked form: per head ``4 T C d`` (intra tiles) + ``4 T d^2`` (state
        reads and updates); density = ratio to causal dense attention's FLOPs."""
        check_int("T", T)
        c = min(self.block, T)
        return cost_vs_dense(4.0 * T * self.dim * (c + self.head_dim), T, self.dim)


__all__ = ["Lightning", "alibi_slopes"]
