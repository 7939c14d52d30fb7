"""lse_merge: combine partial attention results over disjoint key sets by log-sum-exp (the
online-softmax merge of Ring Attention, arXiv 2310.01889).

The sparse decode kernels have a split-K merge, but it is a Triton kernel fused into the decode
launch (one query row per (batch, head), partials in a private workspace), so it cannot merge
``[B, H, T, D]`` partials; this is the one torch merge for context parallelism.
"""
from __future__ import annotations

from typing import Optional

import torch


def _safe(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def lse_merge(out_a: Optional[torch.Tensor], lse_a: Optional[torch.Tensor], out_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lse_merge: softmax attention over keys A and B from the parts over A and over B.

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
    ref = _safe(lse)
    wa = torch.exp(lse_a - ref)[..., None]
    wb = torch.exp(lse_b - ref)[..., None]
    return out_a * wa + out_b * wb, lse


def part_weight(lse_part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Weight ``exp(lse_part - lse)`` of a part in the merged result (0 where either is ``-inf``)."""
    return torch.exp(lse_part.float() - _safe(lse.float()))
