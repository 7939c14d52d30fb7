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


def _positive_real(x, name: str, what: str) -> float:
    """``x`` (a Python / NumPy real scalar or a one-element real tensor) as a positive finite float, or a
    ``ValueError`` naming ``name``; ``what`` is added to the messages (e.g. " (the logit cap)")."""
    val = x
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"{name}: expected None or a positive finite number (a 0-d real tensor works too), "
                             f"got a tensor of shape {tuple(x.shape)} and dtype {x.dtype}")
        val = x.item()
    elif getattr(x, "ndim", None) == 0 and hasattr(x, "item"):
        val = x.item()  # a 0-d numpy array
    if isinstance(val, bool) or not isinstance(val, numbers.Real):
        raise ValueError(f"{name}: expected None or a positive finite number{what}, got {x!r} ({type(x).__name__})")
    val = float(val)
    if not math.isfinite(val) or val <= 0:
        raise ValueError(f"{name}: expected None or a positive finite number{what}, got {val!r}")
    return val


def check_scale(scale, name: str = "scale") -> Optional[float]:
    """check_scale: ``None`` or a positive finite number up to ``MAX_SCALE`` -> ``None`` or a Python float.

    Accepts Python and NumPy real scalars (``np.float32(0.125)``) and 0-d (or one-element) real
    tensors; bools, NaN, infinities, zero, negative and overflowing values raise ``ValueError``
    naming ``name`` and showing the value.
    """
    if scale is None:
        return None
    val = _positive_real(scale, name, "")
    if val > MAX_SCALE:
        raise ValueError(f"{name}: expected at most {MAX_SCALE:g} (scores q.k * scale are float32 and overflow "
                         f"to inf, which makes the softmax NaN), got {val!r}")
    return val


def check_softcap(softcap, name: str = "softcap") -> Optional[float]:
    """check_softcap: ``None`` or a positive finite number (Gemma 2's logit cap) -> ``None`` or a Python float.

    Scores become ``softcap * tanh(s / softcap)``. Accepts the same scalar kinds as ``check_scale``;
    0, negative, NaN, infinite and bool values raise ``ValueError`` naming ``name``.
    """
    return None if softcap is None else _positive_real(softcap, name, " (the logit cap)")


def check_sinks(sinks, heads: int, device, name: str = "sinks", values: bool = True) -> Optional[torch.Tensor]:
    """check_sinks: ``None`` or a floating tensor of ``heads`` learned sink logits (one per query head,
    gpt-oss) on ``device`` -> the tensor (unchanged, so autograd reaches it).

    ``values``: also check (one host sync; skipped while torch.compile traces) that no value is NaN or
    +inf; ``-inf`` is allowed and means no sink for that head. Raises ``ValueError`` naming ``name``.
    """
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise ValueError(f"{name}: expected None or a float tensor [{heads}] (one sink logit per query head), "
                         f"got {type(sinks).__name__}")
    if sinks.dim() != 1 or sinks.shape[0] != heads:
        raise ValueError(f"{name}: expected shape [{heads}] (one sink logit per query head), got {tuple(sinks.shape)}")
    if not sinks.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating dtype, got {sinks.dtype}")
    if sinks.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device} (as q), got {sinks.device}")
    if values and not torch.compiler.is_compiling() and sinks.numel():
        if bool((torch.isnan(sinks) | torch.isposinf(sinks)).any()):
            raise ValueError(f"{name}: expected finite values or -inf, got NaN or +inf")
    return sinks
