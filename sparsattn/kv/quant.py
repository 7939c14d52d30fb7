"""Quant: per-token symmetric int8 / int4 quantisation of K/V rows, dequantised in torch.

Each row (one token of one head, ``D`` values) gets one float32 scale ``max|x| / qmax`` with
``qmax = 2**(bits-1) - 1`` (127 for int8, 7 for int4); codes are rounded to nearest and clamped,
so ``|x - dequant(x)| <= scale / 2`` element-wise. int4 codes are packed two per byte.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")
    return 2 ** (bits - 1) - 1


@dataclass
class QuantizedRows:
    """QuantizedRows: codes (int8, or two int4 per uint8 byte) + a float32 scale per row."""

    codes: Tensor
    scale: Tensor  # [..., 1] float32
    bits: int
    dim: int
    dtype: torch.dtype

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self) -> Tensor:
        c = self.codes
        if self.bits == 4:
            lo = (c & 0xF).to(torch.int8)
            hi = ((c >> 4) & 0xF).to(torch.int8)
            lo = torch.where(lo > 7, lo - 16, lo)
            hi = torch.where(hi > 7, hi - 16, hi)
            c = torch.stack([lo, hi], -1).flatten(-2)[..., : self.dim]
        return (c.float() * self.scale.float()).to(self.dtype)


def quantize_rows(x: Tensor, bits: int) -> QuantizedRows:
    """quantize_rows: per-row (last dim) symmetric quantisation of ``x [..., D]`` to ``bits`` (4 or 8)."""
    qmax = _qmax(bits)
    if not x.dtype.is_floating_point:
        raise ValueError(f"x: expected a floating tensor, got {x.dtype}")
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    scale = amax / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(xf / scale.float()), -qmax, qmax).to(torch.int8)
    D = x.shape[-1]
    if bits == 4:
        if D % 2:
            codes = torch.cat([codes, torch.zeros_like(codes[..., :1])], -1)
        u = (codes.to(torch.int16) & 0xF).to(torch.uint8)
        codes = u[..., 0::2] | (u[..., 1::2] << 4)
    return QuantizedRows(codes, scale, bits, D, x.dtype)


def error_bound(q: QuantizedRows) -> Tensor:
    """The element-wise bound ``scale / 2`` (plus the output dtype's rounding), broadcastable to the rows."""
    return q.scale.float() / 2


__all__ = ["QuantizedRows", "quantize_rows", "error_bound"]
