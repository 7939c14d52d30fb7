"""Unit scores: score every unit (page or token) of a KV cache from compressed key summaries.

Decode-time selection methods rank the cache by a cheap score and keep the top units; at long
context that scoring pass, not the attention over the kept units, is what costs (it reads a summary
of the *whole* cache every step). These functions do it in one memory-bound pass per (batch, KV
head), all query heads of a GQA group at once, reducing over the group in registers:

* ``bound_scores(q, lo, hi)``: ``sum_d max(q_d * lo_d, q_d * hi_d)`` per unit from element-wise key
  bounds ``lo``/``hi`` ``[B, Hkv, n, D]`` (an upper bound of ``q·k`` over the unit's keys).
* ``label_scores(qc, codes, scale, zero, r=...)``: ``qc · (codes * scale + zero)`` per token from
  ``r`` key channels quantised per row to 4 bits (two codes per byte, low nibble first) or 8 bits.

``backend``: None = the Triton kernel where ``sparsattn.kernels.backends`` allows it (CUDA, or the CPU
with ``TRITON_INTERPRET=1``), the torch reference elsewhere; ``"triton"`` (CUDA,
or the CPU with ``TRITON_INTERPRET=1``) or ``"reference"``. Outputs are float32 ``[B, Hkv, n]``
(``reduce`` over each group: ``"max"``, ``"mean"``, ``"sum"``) or ``[B, Hq, n]`` (``"none"``),
times ``mult``.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch

from .. import backends as _backends
from .reference import REDUCES, bound_scores_reference, label_scores_reference, unpack_codes

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def _use_triton(x: torch.Tensor, backend: Optional[str]) -> bool:
    if backend not in (None, "triton", "reference"):
        raise _err("backend", "None, 'triton' or 'reference'", repr(backend))
    return _backends.choose("unit_scores", x, backend) == "triton"


def _check_common(q: torch.Tensor, name: str, Hkv: int, reduce: str, mult) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or not q.dtype.is_floating_point:
        raise _err(name, "a float tensor [B, Hq, D]", getattr(q, "shape", type(q).__name__))
    if Hkv == 0 or q.shape[1] % Hkv:
        raise _err(f"{name} heads", f"a multiple of the {Hkv} KV heads", q.shape[1])
    if reduce not in REDUCES:
        raise _err("reduce", "'max', 'mean', 'sum' or 'none'", repr(reduce))
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult):
        raise _err("mult", "a finite number", mult)


def bound_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *, reduce: str = "max", mult: float = 1.0,
                 backend: Optional[str] = None) -> torch.Tensor:
    """bound_scores: upper bounds of ``q·k`` per unit from element-wise key bounds.

    Args:
        q: ``[B, Hq, D]`` one query per head.
        lo, hi: ``[B, Hkv, n, D]`` element-wise min / max of each unit's keys (same dtype and device;
            ``Hkv`` divides ``Hq``).
        reduce: over the query heads of a KV group: ``"max"`` (default), ``"mean"``, ``"sum"``;
            ``"none"`` keeps them.
        mult: factor applied to the result.
        backend: see the module docstring.
    Returns: float32 ``[B, Hkv, n]`` (``[B, Hq, n]`` for ``"none"``).
    """
    for name, t in (("lo", lo), ("hi", hi)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise _err(name, "a tensor [B, Hkv, n, D]", getattr(t, "shape", type(t).__name__))
    if hi.shape != lo.shape or hi.dtype != lo.dtype or hi.device != lo.device:
        raise _err("hi", f"shape {tuple(lo.shape)}, dtype {lo.dtype}, device {lo.device} (as lo)",
                   (tuple(hi.shape), hi.dtype, hi.device))
    _check_common(q, "q", lo.shape[1], reduce, mult)
    if q.shape[0] != lo.shape[0] or q.shape[2] != lo.shape[3] or q.device != lo.device:
        raise _err("q", f"batch {lo.shape[0]}, head_dim {lo.shape[3]} on {lo.device} (as lo)",
                   (tuple(q.shape), q.device))
    if lo.shape[3] > 256:
        raise _err("head_dim", "<= 256", lo.shape[3])
    if _use_triton(q, backend):
        from .triton import bound_scores_triton

        return bound_scores_triton(q, lo, hi, reduce, mult)
    return bound_scores_reference(q, lo, hi, reduce, mult)


def label_scores(qc: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, r: int,
                 bits: int = 4, reduce: str = "max", mult: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """label_scores: ``qc · dequant(codes)`` per token from per-row quantised key channels.

    Args:
        qc: float ``[B, Hq, r]``: each query head's values on the ``r`` channels that were quantised.
        codes: uint8 ``[B, Hkv, n, ceil(r / 2)]`` (``bits=4``: channel ``2i`` in the low nibble of
            byte ``i``, ``2i + 1`` in the high one) or ``[B, Hkv, n, r]`` (``bits=8``).
        scale, zero: float ``[B, Hkv, n]``: row ``t`` dequantises as ``codes * scale + zero``.
        r: number of channels; bits: 4 or 8; reduce, mult, backend: as ``bound_scores``.
    Returns: float32 ``[B, Hkv, n]`` (``[B, Hq, n]`` for ``"none"``).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise _err("r", "an int >= 1", r)
    if bits not in (4, 8):
        raise _err("bits", "4 or 8", bits)
    width = -(-r // 2) if bits == 4 else r
    if not isinstance(codes, torch.Tensor) or codes.dim() != 4 or codes.dtype != torch.uint8 or codes.shape[3] != width:
        raise _err("codes", f"a uint8 tensor [B, Hkv, n, {width}]",
                   (getattr(codes, "dtype", None), tuple(getattr(codes, "shape", ()))))
    B, Hkv, n = codes.shape[:3]
    for name, t in (("scale", scale), ("zero", zero)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, Hkv, n) or not t.dtype.is_floating_point \
                or t.device != codes.device:
            raise _err(name, f"a float tensor [{B}, {Hkv}, {n}] on {codes.device}",
                       (getattr(t, "dtype", None), tuple(getattr(t, "shape", ()))))
    _check_common(qc, "qc", Hkv, reduce, mult)
    if qc.shape[0] != B or qc.shape[2] != r or qc.device != codes.device:
        raise _err("qc", f"[{B}, Hq, r={r}] on {codes.device}", (tuple(qc.shape), qc.device))
    if _use_triton(qc, backend):
        from .triton import label_scores_triton

        return label_scores_triton(qc, codes, scale, zero, r, bits, reduce, mult)
    return label_scores_reference(qc, codes, scale, zero, r, bits, reduce, mult)


__all__ = ["bound_scores", "label_scores", "bound_scores_reference", "label_scores_reference", "unpack_codes"]
