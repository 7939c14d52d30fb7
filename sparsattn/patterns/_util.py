"""Patterns: shared helpers of the patterns package (error message, ceil-div)."""
from __future__ import annotations

import torch



Tensor = torch.Tensor


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def list_width(counts: Tensor, bound: int) -> int:
    """list_width: the width of index lists holding ``counts`` entries per row: ``max(counts.max(), 1)``
    (one host sync), or, while torch.compile traces, the static upper bound ``max(bound, 1)`` (no
    data-dependent shape, hence no graph break; entries past ``counts`` are padding as always)."""
    if torch.compiler.is_compiling():
        return max(int(bound), 1)
    return max(int(counts.max()) if counts.numel() else 0, 1)
