"""selective: query- and position-dependent temperature (Selective Attention, arXiv 2411.12892)."""
from __future__ import annotations

import torch
from torch import nn

from ... import patterns
from ..base import attend, pattern_cost, register_layer
from ._qkv import QKVLayer, check_int, check_pow2


@register_layer("selective")
class SelectiveAttention(QKVLayer):
    """SelectiveAttention: softmax attention whose queries (and values) are scaled by learned
    inverse temperatures that depend on the token and the query's position (Selective Attention:
    Enhancing Transformer through Principled Context Control, Selective Self-Attention, arXiv
    2411.12892).

    Per head h: ``q~_i = tau_q(x_i, i) * q_i`` with ``tau_q = 1 + tanh(w_q,h . x_i) + beta_h *
    log(1 + i)`` (token term + a slowly growing position term against attention dilution), and
    ``v~_j = (1 + tanh(w_v,h . x_j)) * v_j`` (value temperature: suppress noisy tokens). Then
    ordinary softmax attention on q~, k, v~ through ``sparsattn.attention``: dense (``base="dense"``)
    or on a sparse pattern (``base="window"``: causal sliding window of ``window`` tokens), i.e. the
    temperatures work on top of either. ``w`` and ``beta`` start at 0, so an untrained layer is
    exactly dense attention.

    Defaults: query and value scaling with token and position terms (the paper's best: Q and V).
    Differences: the paper shares the temperature weights with the existing projections (< 0.5%
    extra parameters); here they are two ``dim -> heads`` maps (2 * dim * heads parameters); the
    exact form of its position term was not retrieved (METHODS.md C9 [mem]): ``beta * log(1 + i)``.
    """

    paper = "Selective Attention: Enhancing Transformer through Principled Context Control (arXiv 2411.12892)"
    kind = "sparse"
    content_based = True

    def __init__(self, dim: int, heads: int, causal: bool = True, scale_query: bool = True, scale_value: bool = True,
                 token_temperature: bool = True, position_temperature: bool = True, base: str = "dense",
                 window: int = 256, block_size: int = 64, bias: bool = False):
        super().__init__()
        self._init_qkv(dim, heads, causal, bias)
        for name, v in (("scale_query", scale_query), ("scale_value", scale_value),
                        ("token_temperature", token_temperature), ("position_temperature", position_temperature)):
            if not isinstance(v, bool):
                raise ValueError(f"{name}: expected a bool, got {v!r}")
        if base not in ("dense", "window"):
            raise ValueError(f"base: expected 'dense' or 'window', got {base!r}")
        self.scale_query, self.scale_value = scale_query, scale_value
        self.token_temperature, self.position_temperature = token_temperature, position_temperature
        self.base = base
        self.window = check_int("window", window)
        self.block_size = check_pow2("block_size", block_size)
        self.tau_q = nn.Linear(dim, heads, bias=False)
        self.tau_v = nn.Linear(dim, heads, bias=False)
        nn.init.zeros_(self.tau_q.weight)
        nn.init.zeros_(self.tau_v.weight)
        self.beta = nn.Parameter(torch.zeros(heads))
        self._pat: dict = {}

    def _pattern(self, T: int, device):
        if self.base == "dense":
            return None
        key = (T, str(device))
        if key not in self._pat:
            self._pat = {key: patterns.sliding_window(T, self.window, causal=self.causal, block_q=self.block_size,
                                                      device=device)}
        return self._pat[key]

    def temperatures(self, x: torch.Tensor) -> tuple:
        """(tau_q, tau_v) ``[B, heads, T, 1]`` (None where the scaling is off)."""
        T = x.shape[1]
        tq = tv = None
        if self.scale_query:
            tq = torch.ones(x.shape[0], T, self.heads, device=x.device, dtype=x.dtype)
            if self.token_temperature:
                tq = tq + torch.tanh(self.tau_q(x))
            if self.position_temperature:
                pos = torch.log1p(torch.arange(T, device=x.device, dtype=x.dtype))
                tq = tq + pos[None, :, None] * self.beta.to(x.dtype)
            tq = tq.transpose(1, 2)[..., None]
        if self.scale_value and self.token_temperature:
            tv = (1 + torch.tanh(self.tau_v(x))).transpose(1, 2)[..., None]
        return tq, tv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Selective attention of ``x [B, T, dim]``."""
        self.check_x(x)
        q, k, v = self.split(x)
        tq, tv = self.temperatures(x)
        if tq is not None:
            q = q * tq.to(q.dtype)
        if tv is not None:
            v = v * tv.to(v.dtype)
        return self.merge(attend(q, k, v, self._pattern(x.shape[1], x.device), causal=self.causal))

    def cost(self, T: int) -> dict:
        """Dense cost, or the sliding window's pattern cost with ``base="window"``."""
        if self.base == "dense":
            return super().cost(T)
        return pattern_cost(self._pattern(T, "cpu"), self.heads, self.head_dim)

