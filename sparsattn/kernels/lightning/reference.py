"""Lightning attention references: causal linear attention with a per-head exponential decay
(TransNormerLLM, arXiv 2307.14995; Lightning Attention-2, arXiv 2401.04658).

    o_t = sum_{s <= t} lambda_h^(t - s) (scale * q_t . k_s) v_s,   lambda_h = exp(log_decay_h) in (0, 1]

Three plain-torch forms of the same operator, all with inputs ``q, k [B, H, T, D]``,
``v [B, H, T, E]`` and ``log_decay [H]`` (<= 0; float32):

* ``lightning_quadratic``: the masked-decay quadratic form ``[(Q K^T) * M] V`` with
  ``M_ts = exp(log_decay * (t - s))`` for ``t >= s`` (O(T^2) memory; the test oracle);
* ``lightning_recurrent``: the step recurrence ``S_t = lambda S_{t-1} + k_t v_t^T``,
  ``o_t = q_t S_t`` (one token at a time; also the decode step, with a carried state);
* ``lightning_chunked``: the Lightning Attention-2 tiling in vectorised torch (intra-chunk
  masked quadratic form + inter-chunk recurrent state, chunks processed with one scan over
  chunks), differentiable by autograd: the CPU path of the ``lightning`` mixer.

Every decay factor is ``exp`` of a non-positive number (``log_decay * distance``), computed in
float32 (or float64 for float64 inputs), so no factor overflows and bf16 inputs on long sequences
cannot produce inf/NaN through the decay.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> None:
    """check_inputs: ValueError naming the argument when shapes, dtypes or devices disagree, or a
    decay is positive / not finite."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-d tensor [B, H, T, D], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}.dtype: expected a floating dtype, got {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {tuple(q.shape)} (as q), got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected [B, H, T] = {tuple(q.shape[:3])} (as q), got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k.dtype/v.dtype: expected {q.dtype} (as q), got {k.dtype}/{v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k/v.device: expected {q.device} (as q), got {k.device}/{v.device}")
    if not isinstance(log_decay, torch.Tensor) or log_decay.shape != (q.shape[1],):
        raise ValueError(f"log_decay: expected a tensor of shape [H] = [{q.shape[1]}], got "
                         f"{getattr(log_decay, 'shape', type(log_decay).__name__)}")
    if log_decay.device != q.device:
        raise ValueError(f"log_decay.device: expected {q.device} (as q), got {log_decay.device}")
    if not bool(torch.isfinite(log_decay).all()) or bool((log_decay > 0).any()):
        raise ValueError("log_decay: expected finite values <= 0 (decay lambda = exp(log_decay) in (0, 1])")


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def lightning_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                        scale: Optional[float] = None) -> torch.Tensor:
    """lightning_quadratic: decayed causal linear attention as ``[(scale Q K^T) * M] V`` (Lightning
    Attention-2, arXiv 2401.04658), ``M_ts = lambda^(t-s)`` for ``t >= s`` else 0.

    Computed in float32 (float64 for float64 inputs), returned in q's dtype. ``scale`` defaults to
    ``D ** -0.5``.
    """
    check_inputs(q, k, v, log_decay)
    acc = _acc_dtype(q)
    T = q.shape[2]
    pos = torch.arange(T, device=q.device, dtype=acc)
    dist = pos[:, None] - pos[None, :]  # t - s
    causal = dist >= 0
    m = torch.exp(log_decay.to(acc)[:, None, None] * dist.clamp_min(0)) * causal  # [H, T, T]
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * _scale(q, scale)
    return ((s * m) @ v.to(acc)).to(q.dtype)


def lightning_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                        scale: Optional[float] = None, state: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """lightning_recurrent: the step recurrence ``S_t = lambda S_{t-1} + k_t v_t^T``,
    ``o_t = scale q_t S_t`` (TransNormerLLM, arXiv 2307.14995), one token at a time.

    ``state``: optional ``[B, H, D, E]`` state carried from earlier tokens (decode); returns
    ``(out [B, H, T, E] in q's dtype, state [B, H, D, E] float32/float64)``.
    """
    check_inputs(q, k, v, log_decay)
    acc = _acc_dtype(q)
    B, H, T, D = q.shape
    E = v.shape[-1]
    if state is None:
        state = torch.zeros(B, H, D, E, dtype=acc, device=q.device)
    elif tuple(state.shape) != (B, H, D, E):
        raise ValueError(f"state: expected shape {(B, H, D, E)}, got {tuple(state.shape)}")
    else:
        state = state.to(acc)
    lam = torch.exp(log_decay.to(acc))[None, :, None, None]
    sc = _scale(q, scale)
    outs = []
    for t in range(T):
        state = lam * state + k[:, :, t, :, None].to(acc) * v[:, :, t, None, :].to(acc)
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t].to(acc) * sc, state))
    out = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, E, dtype=acc)
    return out.to(q.dtype), state


def lightning_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                      scale: Optional[float] = None, chunk: int = 64) -> torch.Tensor:
    """lightning_chunked: Lightning Attention-2 tiling in vectorised torch (arXiv 2401.04658).

    Per chunk of ``chunk`` tokens: intra ``[(Q_c K_c^T) * M] V_c``; inter ``Lambda Q_c S_c`` with
    ``Lambda = diag(lambda^(i+1))`` and ``S_c`` the decayed state of all earlier chunks; the chunk
    states come from a scan over chunks ``S_{c+1} = lambda^C S_c + (lambda^(C-1-j) K_c)^T V_c``.
    Differentiable by autograd; computed in float32 (float64 for float64 inputs).
    """
    check_inputs(q, k, v, log_decay)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    acc = _acc_dtype(q)
    B, H, T, D = q.shape
    E = v.shape[-1]
    C = min(chunk, max(T, 1))
    n = -(-T // C)
    pad = n * C - T
    sc = _scale(q, scale)

    def split(x):
        x = x.to(acc)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, n, C, x.shape[-1])

    qc, kc, vc = split(q) * sc, split(k), split(v)
    g = log_decay.to(acc)[:, None]  # [H, 1]
    i = torch.arange(C, device=q.device, dtype=acc)
    dist = i[:, None] - i[None, :]
    mask = torch.exp(g[:, :, None] * dist.clamp_min(0)) * (dist >= 0)  # [H, C, C]
    o = ((qc @ kc.transpose(-1, -2)) * mask[:, None]) @ vc  # intra
    q_decay = torch.exp(g * (i + 1))  # [H, C]: lambda^(i+1)
    k_decay = torch.exp(g * (C - 1 - i))  # [H, C]: lambda^(C-1-j)
    chunk_kv = (kc * k_decay[:, None, :, None]).transpose(-1, -2) @ vc  # [B, H, n, D, E]
    lam_c = torch.exp(g * C)[:, :, None, None]  # [H, 1, 1, 1] -> broadcast over [B, H, D, E]
    states = []
    s = torch.zeros(B, H, D, E, dtype=acc, device=q.device)
    for c in range(n):
        states.append(s)
        s = lam_c[None, :, 0] * s + chunk_kv[:, :, c]
    st = torch.stack(states, dim=2)  # [B, H, n, D, E]: state before chunk c
    o = o + (qc * q_decay[:, None, :, None]) @ st
    o = o.reshape(B, H, n * C, E)[:, :, :T]
    return o.to(q.dtype)
