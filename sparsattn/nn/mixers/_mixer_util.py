"""Shared pieces of the recurrent / convolutional mixers in this folder (not a layer;
``_``-prefixed modules are not scanned by the registry): argument checks, the input check, the
head split/merge and the cost rule (parts with an lse merge through
``sparsattn.kernels.merge.merge_lse``) relative to dense attention."""
from __future__ import annotations

import math

import torch


def check_int(name: str, v, lo: int = 1) -> int:
    """``v`` as an int >= ``lo`` or a ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    return v


def check_float(name: str, v, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> float:
    """``v`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``) or a ValueError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or v > hi \
            or (lo_open and v == lo):
        raise ValueError(f"{name}: expected a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def check_bool(name: str, v) -> bool:
    """``v`` as a bool or a ValueError naming ``name``."""
    if not isinstance(v, bool):
        raise ValueError(f"{name}: expected True or False, got {v!r}")
    return v


def check_common(dim, heads, causal, modes=(True,)) -> None:
    """Validate ``dim``/``heads`` (dim a multiple of heads) and ``causal`` against ``modes``."""
    check_int("dim", dim)
    check_int("heads", heads)
    if dim % heads:
        raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
    if not isinstance(causal, bool) or causal not in modes:
        raise ValueError(f"causal: expected one of {modes} (this mixer is causal by construction), got {causal!r}")


def check_x(x, dim: int) -> None:
    """ValueError unless ``x`` is a floating ``[B, T, dim]`` tensor with T >= 1."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim or x.shape[1] < 1:
        raise ValueError(f"x: expected a tensor [batch, tokens, {dim}], got "
                         f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")


def heads_split(y: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, heads * d]`` -> ``[B, heads, T, d]``."""
    B, T, C = y.shape
    return y.view(B, T, heads, C // heads).transpose(1, 2)


def heads_merge(o: torch.Tensor) -> torch.Tensor:
    """``[B, heads, T, d]`` -> ``[B, T, heads * d]``."""
    B, H, T, d = o.shape
    return o.transpose(1, 2).reshape(B, T, H * d)


def cost_vs_dense(flops: float, T: int, dim: int) -> dict[str, float]:
    """``{"density", "flops"}`` for a mixer: ``flops`` per sequence, and ``density`` = those FLOPs
    over causal dense attention's ``4 * T(T+1)/2 * dim`` (a compute ratio: a mixer computes no
    query-key pairs)."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T: expected a positive int, got {T!r}")
    dense = 4.0 * T * (T + 1) / 2 * dim
    return {"density": float(flops) / dense, "flops": float(flops)}
