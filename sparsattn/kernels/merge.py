"""merge: combine partial attention results by their log-sum-exp (the one place this is written).

Attention over a key set that is split into disjoint parts can be computed part by part: each part
gives ``(out_i, lse_i)`` where ``out_i`` is the softmax-weighted mean of its values and ``lse_i``
the natural log of its softmax normaliser. The whole is

    lse = log sum_i exp(lse_i),     out = sum_i exp(lse_i - lse) * out_i.

The sparse decode kernel's split-K merge (``kernels/sparse_decode/triton.py``, ``_merge_kernel``) is
the fused Triton form of this for decode partials; this is the differentiable torch form used by
approximations (HyperAttention, Scatterbrain, Combiner...) that merge exact sparse parts with
estimated parts (``merge_lse``), and by context parallelism, which folds parts in as they arrive
(``merge_running``, the online-softmax merge of Ring Attention, arXiv 2310.01889) and weights a
part's gradient by its share (``part_weight``). Nobody re-normalises attention by hand elsewhere.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["merge_lse", "merge_running", "part_weight"]


def merge_lse(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_lse: merge partial attention results ``[(out_i [..., T, D], lse_i [..., T]), ...]``.

    Parts with ``lse_i = -inf`` (no key in that part for a row) contribute nothing; a row with no
    key in any part gets ``out = 0`` and ``lse = -inf`` (never NaN, also in the gradient). The
    arithmetic is float32 (float64 inputs stay float64); ``out`` comes back in the first part's
    dtype, ``lse`` in float32 (float64 for float64 inputs). Differentiable in every ``out_i`` and
    ``lse_i``.
    """
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ValueError(f"parts: expected a non-empty list of (out, lse) pairs, got {type(parts).__name__}")
    for i, p in enumerate(parts):
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, torch.Tensor) for t in p)):
            raise ValueError(f"parts[{i}]: expected an (out, lse) pair of tensors")
        o, l = p
        if o.shape[:-1] != l.shape:
            raise ValueError(f"parts[{i}]: lse shape {tuple(l.shape)} must equal out shape without its last "
                             f"dim {tuple(o.shape[:-1])}")
        if o.shape != parts[0][0].shape:
            raise ValueError(f"parts[{i}]: out shape {tuple(o.shape)} differs from parts[0] {tuple(parts[0][0].shape)}")
    out_dtype = parts[0][0].dtype
    wide = torch.float64 if any(o.dtype == torch.float64 or l.dtype == torch.float64 for o, l in parts) else torch.float32
    if len(parts) == 1:
        return parts[0][0], parts[0][1].to(wide)
    lse = torch.stack([l.to(wide) for _, l in parts])  # [P, ..., T]
    m = lse.amax(0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m_safe)  # exp(-inf) = 0, gradient 0
    tot = w.sum(0)
    ok = tot > 0
    tot_safe = torch.where(ok, tot, torch.ones_like(tot))
    out = sum((w[i] / tot_safe)[..., None] * o.to(wide) for i, (o, _) in enumerate(parts))
    lse_out = torch.where(ok, m_safe + torch.log(tot_safe), torch.full_like(tot, float("-inf")))
    return out.to(out_dtype), lse_out


def _finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def merge_running(out_a: Optional[torch.Tensor], lse_a: Optional[torch.Tensor], out_b: torch.Tensor,
                  lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_running: fold one more part into a running result (softmax attention over keys A and B
    from the parts over A and over B).

    Args:
        out_a, lse_a: the running result (float32 ``[..., T, D]`` and ``[..., T]``) or None (empty).
        out_b, lse_b: a new part (any float dtype); rows without keys have ``lse = -inf``.
    Returns:
        ``(out float32, lse float32)``; rows with no key in either part stay ``0`` / ``-inf``.
    """
    out_b = out_b.float()
    lse_b = lse_b.float()
    if out_a is None:
        return out_b, lse_b
    lse = torch.logaddexp(lse_a, lse_b)
    ref = _finite_or_zero(lse)
    wa = torch.exp(lse_a - ref)[..., None]
    wb = torch.exp(lse_b - ref)[..., None]
    return out_a * wa + out_b * wb, lse


def part_weight(lse_part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """part_weight: the weight ``exp(lse_part - lse)`` of a part in the merged result (0 where either
    is ``-inf``)."""
    return torch.exp(lse_part.float() - _finite_or_zero(lse.float()))
