"""Patterns: shared helpers of the patterns package (error message, ceil-div)."""
from __future__ import annotations

import torch



Tensor = torch.Tensor


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
