"""Quant: per-token int8 / int4 quantisation of K/V rows, dequantised in torch.

* ``quantize_rows``: symmetric. Each row (one token of one head, ``D`` values) gets one float32
  scale ``max|x| / qmax`` with ``qmax = 2**(bits-1) - 1`` (127 for int8, 7 for int4); codes are
  rounded to nearest and clamped, so ``|x - dequant(x)| <= scale / 2`` element-wise.
* ``quantize_minmax``: asymmetric min-max per row (codes ``0 .. 2**bits - 1``, a float16 scale
  ``(max - min) / (2**bits - 1)`` and a float16 zero point ``min``), as Double Sparsity's label
  cache (its code quantises labels per token by min/max): ``|x - dequant(x)| <= scale / 2`` plus
  the float16 rounding of the two parameters (``<= 2**-10 * max|x|``).

int4 codes are packed two per byte (element ``2i`` in the low nibble, ``2i + 1`` in the high one).
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


def _pack4(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 ``[..., D]`` -> ``[..., ceil(D / 2)]`` bytes."""
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, torch.zeros_like(codes[..., :1])], -1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: Tensor, dim: int) -> Tensor:
    """unpack4: uint8 ``[..., ceil(dim / 2)]`` (two 4-bit codes per byte) -> uint8 codes ``[..., dim]``."""
    return torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)[..., :dim]


@dataclass
class MinMaxRows:
    """MinMaxRows: asymmetric per-row codes (uint8; two 4-bit codes per byte at 4 bits) + float16
    ``scale`` / ``zero`` ``[..., 1]``; ``dequantize() = codes * scale + zero``."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    dim: int

    def unpacked(self) -> Tensor:
        """Codes as uint8 ``[..., dim]`` (one per element)."""
        return unpack4(self.codes, self.dim) if self.bits == 4 else self.codes

    def dequantize(self, dtype=torch.float32) -> Tensor:
        return (self.unpacked().to(torch.float32) * self.scale.float() + self.zero.float()).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


def quantize_minmax(x: Tensor, bits: int = 4) -> MinMaxRows:
    """quantize_minmax: per-row (last dim) asymmetric min-max quantisation of ``x [..., D]`` to ``bits``
    (4: packed two per byte, or 8); float16 scale and zero point per row."""
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise ValueError(f"x: expected a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: expected finite values (NaN/inf cannot be quantised)")
    qmax = 2 ** bits - 1
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    zero = lo.half()
    scale = ((hi - zero.float()) / qmax).half()
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((xf - zero.float()) / scale.float()), 0, qmax).to(torch.uint8)
    if bits == 4:
        codes = _pack4(codes)
    return MinMaxRows(codes, scale, zero, bits, x.shape[-1])


def error_bound(q: QuantizedRows) -> Tensor:
    """The element-wise bound ``scale / 2`` (plus the output dtype's rounding), broadcastable to the rows."""
    return q.scale.float() / 2


__all__ = ["QuantizedRows", "quantize_rows", "error_bound", "MinMaxRows", "quantize_minmax", "unpack4"]
