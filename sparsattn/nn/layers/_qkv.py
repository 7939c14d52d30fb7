"""Shared pieces of the attention layers in this folder: q/k/v projections, head split and merge,
argument checks (not a layer; ``_``-prefixed modules are not scanned by the registry)."""
from __future__ import annotations

import torch
from torch import nn

from ..base import Layer


def check_int(name: str, v, lo: int = 1) -> int:
    """The int ``v`` when ``v >= lo``; ValueError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    return v


def check_pow2(name: str, v, lo: int = 16) -> int:
    """The int ``v`` when it is a power of two >= ``lo`` (the kernel's block sizes)."""
    check_int(name, v, lo)
    if v & (v - 1):
        raise ValueError(f"{name}: expected a power of two >= {lo}, got {v}")
    return v


def check_float(name: str, v, lo: float = 0.0, hi: float = float("inf"), *, lo_open: bool = False) -> float:
    """The float ``v`` when it lies in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v > hi or v < lo or (lo_open and v == lo):
        raise ValueError(f"{name}: expected a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


class QKVLayer(Layer):
    """QKVLayer: q/k/v/out projections and the checks every attention layer here shares."""

    def _init_qkv(self, dim: int, heads: int, causal, bias: bool = False) -> None:
        check_int("dim", dim)
        check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
        if causal not in self.causal_modes or not isinstance(causal, bool):
            raise ValueError(f"causal: expected one of {self.causal_modes}, got {causal!r}")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, dim // heads, causal
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def check_x(self, x: torch.Tensor) -> None:
        """ValueError unless ``x`` is a float ``[B, T, dim]`` tensor with T >= 1."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] < 1:
            raise ValueError(f"x: expected a tensor [batch, tokens, {self.dim}], got "
                             f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, heads, T, head_dim]`` of ``x [B, T, dim]``."""
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """``out_proj`` of the heads' outputs ``o [B, heads, T, head_dim]`` -> ``[B, T, dim]``."""
        B, H, T, D = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, T, H * D))

    def attend(self, q, k, v):
        """``(out, lse)`` of the layer's attention core on q/k/v ``[B, heads, T, head_dim]``
        (layers whose ``forward`` is the default below define it)."""
        raise NotImplementedError(f"{type(self).__name__}.attend")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on ``x [B, T, dim]``: projections, ``attend``, output projection."""
        self.check_x(x)
        q, k, v = self.split(x)
        out, _ = self.attend(q, k, v)
        return self.merge(out)
