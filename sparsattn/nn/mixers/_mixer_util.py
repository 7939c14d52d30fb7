"""Shared pieces of the recurrent / convolutional mixers in this folder (not a layer;
``_``-prefixed modules are not scanned by the registry): argument checks, the input check, the
head split/merge, merging (out, lse) parts, and the cost rule relative to dense attention."""
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


def merge_lse(parts) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_lse: combine normalised attention parts ``[(out_i, lse_i), ...]`` over disjoint key
    sets into one ``(out, lse)`` by log-sum-exp weights (``out = sum_i exp(lse_i - lse) out_i``,
    ``lse = logsumexp_i lse_i``); a part with ``lse = -inf`` (no key) contributes nothing.
    out ``[..., T, E]``, lse ``[..., T]`` (float32 or float64)."""
    outs, lses = zip(*parts)
    lse_all = torch.stack([l.to(torch.float64 if l.dtype == torch.float64 else torch.float32) for l in lses])
    lse = torch.logsumexp(lse_all, dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lse_all - safe)  # exp(-inf) = 0 for empty parts
    out = sum(w_i[..., None] * o.to(w.dtype) for w_i, o in zip(w, outs))
    return out.to(outs[0].dtype), lse


def cost_vs_dense(flops: float, T: int, dim: int) -> dict[str, float]:
    """``{"density", "flops"}`` for a mixer: ``flops`` per sequence, and ``density`` = those FLOPs
    over causal dense attention's ``4 * T(T+1)/2 * dim`` (a compute ratio: a mixer computes no
    query-key pairs)."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T: expected a positive int, got {T!r}")
    dense = 4.0 * T * (T + 1) / 2 * dim
    return {"density": float(flops) / dense, "flops": float(flops)}
