"""Shared argument checks of the kernel entry points (attention, varlen, sparse decode)."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

#: largest accepted softmax scale: scores ``q.k * scale`` are float32, and a scale this large already
#: turns softmax into an arg-max for any ordinary input; larger ones overflow the scores to inf
#: (inf - inf = NaN in the softmax) for inputs of ordinary size (issue 10: 1e37 gave NaN)
MAX_SCALE = 1e6


def check_scale(scale, name: str = "scale") -> Optional[float]:
    """check_scale: ``None`` or a positive finite number up to ``MAX_SCALE`` -> ``None`` or a Python float.

    Accepts Python and NumPy real scalars (``np.float32(0.125)``) and 0-d (or one-element) real
    tensors; bools, NaN, infinities, zero, negative and overflowing values raise ``ValueError``
    naming ``name`` and showing the value.
    """
    if scale is None:
        return None
    val = scale
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dtype == torch.bool or scale.is_complex():
            raise ValueError(f"{name}: expected None or a positive finite number (a 0-d real tensor works too), "
                             f"got a tensor of shape {tuple(scale.shape)} and dtype {scale.dtype}")
        val = scale.item()
    elif hasattr(scale, "ndim") and getattr(scale, "ndim", None) == 0 and hasattr(scale, "item"):
        val = scale.item()  # a 0-d numpy array
    if isinstance(val, bool) or not isinstance(val, numbers.Real):
        raise ValueError(f"{name}: expected None or a positive finite number, got {scale!r} "
                         f"({type(scale).__name__})")
    val = float(val)
    if not math.isfinite(val) or val <= 0:
        raise ValueError(f"{name}: expected None or a positive finite number, got {val!r}")
    if val > MAX_SCALE:
        raise ValueError(f"{name}: expected at most {MAX_SCALE:g} (scores q.k * scale are float32 and overflow "
                         f"to inf, which makes the softmax NaN), got {val!r}")
    return val
