"""The property suite's own dense formula (independent of ``sparsattn``'s reference backends).

``masked_attention(q, k, v, allowed, scale)`` is softmax attention restricted to a bool mask, in
float64 (the oracle) or in the inputs' low precision (the precision baseline: scores and ``p @ v``
in the dtype, softmax in float32, as a fused kernel does). Rows without an allowed key give zeros
and ``lse = -inf``. Differentiable (no NaN in the backward either).

Tolerance rule of the project: ``K x`` the error the low-precision baseline makes against the
float64 oracle, floored per dtype (a baseline can be exact by luck on tiny inputs).
"""
import math

import torch

INF = float("-inf")
K = 4.0
#: max-abs floors (outputs and lse, gradients) per dtype: a few units in the last place at |x| ~ 4
FLOOR = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
FLOOR_GRAD = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


def masked_attention(q, k, v, allowed, scale, lowp=False, log_weight=None):
    """Softmax attention of ``q [..., Lq, D]`` on ``k, v [..., Lk, D]`` where ``allowed [..., Lq, Lk]``.

    ``log_weight`` (optional, broadcast like the scores) is added to the logits. Returns
    ``(out, lse)``: float64 unless ``lowp`` (then ``out`` in q's dtype, ``lse`` float32).
    """
    if not lowp:
        q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.float() if lowp else s
    if log_weight is not None:
        s = s + log_weight.to(s.dtype)
    s = s.masked_fill(~allowed, INF)
    m = s.amax(-1, keepdim=True) if s.shape[-1] else torch.zeros(*s.shape[:-1], 1, dtype=s.dtype)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    empty = den == 0
    p = p / torch.where(empty, torch.ones_like(den), den)
    lse = torch.where(empty, torch.full_like(den, INF), torch.log(torch.where(empty, torch.ones_like(den), den)) + m)
    out = (p.to(v.dtype) @ v) if lowp else p @ v
    return out, lse[..., 0]


def max_err(a, b, where=None) -> float:
    """max |a - b| (float64) over ``where`` (bool, broadcast to a), 0 when empty."""
    d = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
    if where is not None:
        d = d[where.cpu().expand_as(d)]
    return float(d.max()) if d.numel() else 0.0


def tolerance(base_err: float, dtype, grad=False) -> float:
    return K * max(base_err, (FLOOR_GRAD if grad else FLOOR)[dtype])


def default_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)
