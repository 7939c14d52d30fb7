"""Shared pieces of the approximation mixers (hyper, scatterbrain, sea, combiner): input checks,
exact attention with its log-sum-exp on small blocks, row gathers and padding.

Not a layer (``_``-prefixed modules are not scanned by the registry). Everything here is plain
torch, float32 inside, differentiable, and vectorised (no loop over tokens).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ...kernels._checks import check_scale as _check_scale

NEG_INF = float("-inf")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_len: bool = True) -> None:
    """ValueError unless q ``[B, H, Tq, D]`` and k, v ``[B, H, Tk, D(v)]`` are float tensors of one
    device with equal batch and heads (and ``Tq == Tk`` when ``same_len``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, tokens, head_dim], got "
                             f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (as q), got {t.device}")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k/v: expected batch and heads {tuple(q.shape[:2])} (as q; repeat GQA heads first) and "
                         f"v tokens equal to k's, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected head_dim {q.shape[3]} (as q), got {k.shape[3]}")
    if same_len and k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected {q.shape[2]} tokens (as q: self-attention), got {k.shape[2]}")
    if q.shape[2] < 1:
        raise ValueError("q: expected at least one token")


def check_scale(scale, D: int) -> float:
    """The softmax scale: ``1/sqrt(D)`` for None, else the library's one scale check
    (``kernels._checks.check_scale``: a positive finite number, NumPy and 0-d tensors accepted)."""
    scale = _check_scale(scale)
    return 1.0 / math.sqrt(D) if scale is None else scale


def softmax_lse(s: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor] = None):
    """Softmax attention from scores ``s [..., n, m]`` (float) on values ``v [..., m, Dv]``, restricted
    to ``keep`` (bool, broadcastable; None = all). Returns ``(out [..., n, Dv], lse [..., n])``;
    rows with no kept key give ``out = 0`` and ``lse = -inf`` (no NaN in value or gradient)."""
    if keep is not None:
        s = s.masked_fill(~keep, NEG_INF)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    ok = den > 0
    den_safe = torch.where(ok, den, torch.ones_like(den))
    out = torch.matmul(p / den_safe, v)
    lse = torch.where(ok, torch.log(den_safe) + m, torch.full_like(den, NEG_INF))[..., 0]
    return out, lse


def autocast_off(x: torch.Tensor):
    """A context with autocast disabled on ``x``'s device (a no-op context where the device has no
    autocast), so that a mixer's arithmetic stays in ``wide_dtype``: under bf16 autocast every
    matmul/einsum would otherwise round to bf16 (8 bits), and on the CPU exp/sum/cumsum too, which a
    normaliser that subtracts nearly equal sums (Scatterbrain's low-rank complement) cannot afford."""
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()


def wide_dtype(x: torch.Tensor) -> torch.dtype:
    """The arithmetic dtype of the mixers: float64 for float64 inputs (the references), else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def causal_keep(n: int, m: Optional[int] = None, device=None, offset: int = 0) -> torch.Tensor:
    """Bool ``[n, m]``: query row i keeps key j when ``j <= i + offset``."""
    m = n if m is None else m
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return j <= i + offset


def exact_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
              keep: Optional[torch.Tensor] = None):
    """Exact softmax attention with its lse, float32 (float64 stays float64): q ``[..., n, D]``,
    k/v ``[..., m, D]``; ``causal`` aligns the diagonal top-left (query i sees keys ``<= i``),
    ``keep`` an extra bool mask. Returns ``(out, lse)`` as ``softmax_lse``. Memory ``O(n * m)`` per
    leading index: callers use it on blocks. On CUDA without gradients (inference) it runs through
    ``sparsattn.attention`` instead (flash-style kernel, same result)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.is_cuda and keep is None and not needs_grad and q.dtype != torch.float64:
        # inference on the GPU: the block-sparse kernel (dense pattern), no O(n * m) scores in memory
        from ...api import attention

        lead = q.shape[:-2]
        flat = lambda t: t.reshape(1, -1, *t.shape[-2:])  # noqa: E731
        out, lse = attention(flat(q), flat(k.to(q.dtype)), flat(v.to(q.dtype)), causal=causal, scale=scale,
                             return_lse=True)
        return out.float().reshape(*lead, *out.shape[-2:]), lse.reshape(*lead, lse.shape[-1])
    wide = wide_dtype(q)
    s = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)) * scale
    if causal:
        c = causal_keep(q.shape[-2], k.shape[-2], q.device)
        keep = c if keep is None else keep & c
    return softmax_lse(s, v.to(wide), keep)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [..., n, D]`` rows picked by ``idx [..., s]`` (int64) -> ``[..., s, D]``."""
    return x.gather(-2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def pad_tokens(x: torch.Tensor, n: int, value: float = 0.0) -> torch.Tensor:
    """``x [..., T, D]`` padded at the end of the token axis to ``n`` rows."""
    T = x.shape[-2]
    return x if T == n else F.pad(x, (0, 0, 0, n - T), value=value)


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def repeat_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """GQA: k ``[B, Hkv, T, D]`` with each KV head repeated for its query group -> ``[B, heads, T, D]``."""
    Hkv = k.shape[1]
    if Hkv == heads:
        return k
    if Hkv < 1 or heads % Hkv:
        raise ValueError(f"k heads: expected a divisor of the {heads} query heads, got {Hkv}")
    return k.repeat_interleave(heads // Hkv, dim=1)


def add_stat(stats: Optional[dict], key: str, value: float) -> None:
    """Accumulate ``value`` under ``key`` in ``stats`` (None: nothing)."""
    if stats is not None:
        stats[key] = stats.get(key, 0.0) + float(value)


def check_generator(generator, device) -> None:
    """ValueError unless ``generator`` is None or a torch.Generator on ``device``'s type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != torch.device(device).type:
        raise ValueError(f"generator: expected a generator on {torch.device(device).type}, got {generator.device}")


def grid_entry(method: str, config: str, run, exact_part=None) -> dict:
    """grid_entry: one row of an approximation's ``fidelity_grid`` (the layer contract's hook, read by
    ``sparsattn.eval.approx_quality.method_grid``): ``method`` and ``config`` labels, ``run(q, k, v,
    stats) -> (out, lse)`` and ``exact_part(q, k, v)`` -> the lse of the exactly computed pairs (None:
    the method has no exact part)."""
    if not isinstance(method, str) or not method or not isinstance(config, str):
        raise ValueError(f"method/config: expected a non-empty string and a string, got {method!r}, {config!r}")
    if not callable(run) or (exact_part is not None and not callable(exact_part)):
        raise ValueError(f"run/exact_part: expected callables (exact_part may be None), got {run!r}, {exact_part!r}")
    return {"method": method, "config": config, "run": run, "exact_part": exact_part}
