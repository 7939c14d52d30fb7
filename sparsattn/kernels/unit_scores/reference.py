"""Reference: unit scores from compressed key summaries, in plain torch (the Triton kernels' twin).

* ``bound_scores_reference``: ``sum_d max(q_d * lo_d, q_d * hi_d)`` for every unit (page) with
  element-wise key bounds ``lo``/``hi``: an upper bound of ``q·k`` over the unit's keys.
* ``label_scores_reference``: ``q_c · (codes * scale + zero)`` for every token with per-row
  min/max-quantised key channels (``bits`` 4: two codes per byte, low nibble first; or 8).

Both reduce the query heads of each GQA group (``"max"``, ``"mean"``, ``"sum"``) or keep them
(``"none"``) and multiply the result by ``mult``. Float32 out.
"""
from __future__ import annotations

import torch

REDUCES = ("max", "mean", "sum", "none")


def reduce_heads(s: torch.Tensor, reduce: str) -> torch.Tensor:
    """reduce_heads: ``[B, Hkv, G, n]`` scores -> ``[B, Hkv, n]`` over each group by ``"max"`` / ``"mean"`` /
    ``"sum"`` (or ``[B, Hkv * G, n]`` for ``"none"``)."""
    if reduce == "max":
        return s.amax(2)
    if reduce == "mean":
        return s.mean(2)
    if reduce == "sum":
        return s.sum(2)
    return s.flatten(1, 2)


def bound_scores_reference(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, reduce: str = "max",
                           mult: float = 1.0) -> torch.Tensor:
    """bound_scores_reference: ``q [B, Hq, D]``, ``lo, hi [B, Hkv, n, D]`` -> float32 ``[B, Hkv or Hq, n]``.

    Computed as ``relu(q)·hi + min(q, 0)·lo`` with the products in the bounds' dtype and float32
    accumulation (as the kernel)."""
    B, Hq, D = q.shape
    Hkv = lo.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D).to(lo.dtype)
    s = (torch.matmul(qg.clamp_min(0), hi.transpose(-1, -2)).float()
         + torch.matmul(qg.clamp_max(0), lo.transpose(-1, -2)).float())
    return reduce_heads(s, reduce) * mult


def unpack_codes(codes: torch.Tensor, r: int, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., ceil(r / 2)]`` (4 bits, low nibble first) or ``[..., r]`` (8 bits) -> ``[..., r]``."""
    if bits == 8:
        return codes[..., :r]
    return torch.stack([codes & 0xF, codes >> 4], -1).flatten(-2)[..., :r]


def label_scores_reference(qc: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           r: int, bits: int = 4, reduce: str = "max", mult: float = 1.0) -> torch.Tensor:
    """label_scores_reference: ``qc [B, Hq, r]`` (each query head's calibrated channels), ``codes``
    uint8 ``[B, Hkv, T, ceil(r/2) or r]``, ``scale, zero [B, Hkv, T]`` -> float32 ``[B, Hkv or Hq, T]``
    of ``qc · (codes * scale + zero)``."""
    B, Hq, _ = qc.shape
    Hkv = codes.shape[1]
    c = unpack_codes(codes, r, bits).float()  # [B, Hkv, T, r]
    qf = qc.float().view(B, Hkv, Hq // Hkv, r)
    s = torch.matmul(qf, c.transpose(-1, -2))  # [B, Hkv, G, T]
    s = s * scale.float()[:, :, None, :] + qf.sum(-1, keepdim=True) * zero.float()[:, :, None, :]
    return reduce_heads(s, reduce) * mult
