"""Top-k recall of a decode selection (the fraction of the keys with the largest exact q.k that a
method's selection keeps); ``eval.recorder.SelectRecorder`` measures it on every decode call."""
from __future__ import annotations

from typing import Optional

import torch

from ..integrations.hf.heads import _to_bh  # pattern rows (batch 1|B, heads 1|Hkv|Hq) -> [B, Hq, ...]

#: how many of the true top keys the recall looks for
TOP_K_RECALL = 10


# ----------------------------------------------------------------------------------------------
# top-k recall of a selection
# ----------------------------------------------------------------------------------------------

def topk_recall(q: torch.Tensor, k: torch.Tensor, pattern, top: int = TOP_K_RECALL,
                kv_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """topk_recall: per (batch, query head), the fraction of the ``top`` keys with the largest exact
    ``q·k`` that the selection contains.

    Args:
        q: ``[B, Hq, D]`` or ``[B, Hq, 1, D]`` (one decode query per sequence).
        k: the cache ``[B, Hkv, T, D]`` (Hkv divides Hq; query head h reads KV head ``h // (Hq/Hkv)``).
        pattern: a ``TokenPattern`` (batch 1 or B; heads 1, Hkv or Hq; pages expanded to tokens) or a
            bool token mask ``[B|1, 1|Hkv|Hq, T]``.
        top: how many true top keys (``min(top, valid tokens)`` per row).
        kv_lens: optional ``[B]`` valid lengths (tokens ``[0, kv_lens[b])``, the decode methods'
            convention); default T.
    Returns:
        float32 ``[B, Hq]`` in [0, 1] (a row with no valid token gives 1: nothing to miss).
    """
    from ..patterns import TokenPattern

    if q.dim() == 4:
        if q.shape[2] != 1:
            raise ValueError(f"q: expected [B, Hq, D] or [B, Hq, 1, D], got {tuple(q.shape)}")
        q = q[:, :, 0]
    if q.dim() != 3 or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q/k: expected [B, Hq, D] and [B, Hkv, T, D] with Hkv dividing Hq, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top: expected an int >= 1, got {top!r}")
    B, Hq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if isinstance(pattern, TokenPattern):
        if pattern.kv_len != T:
            raise ValueError(f"pattern: kv_len {pattern.kv_len} != cache length {T}")
        sel = pattern.to_token_mask()
    elif isinstance(pattern, torch.Tensor) and pattern.dtype == torch.bool and pattern.dim() == 3 and pattern.shape[-1] == T:
        sel = pattern
    else:
        raise ValueError(f"pattern: expected a TokenPattern or a bool mask [B, H, {T}], got {type(pattern).__name__}")
    sel = _to_bh(sel.to(k.device), B, Hq, "pattern")
    G = Hq // Hkv
    s = torch.matmul(q.float().view(B, Hkv, G, D), k.float().transpose(-1, -2)).view(B, Hq, T)
    valid = torch.ones(B, T, dtype=torch.bool, device=k.device)
    if kv_lens is not None:
        kl = torch.as_tensor(kv_lens, device=k.device).long()
        if kl.shape != (B,):
            raise ValueError(f"kv_lens: expected [B={B}], got {tuple(kl.shape)}")
        valid = torch.arange(T, device=k.device)[None, :] < kl[:, None]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    kk = min(top, T)
    if kk == 0:
        return torch.ones(B, Hq, device=k.device)
    val, idx = s.topk(kk, dim=-1)
    ok = torch.isfinite(val)
    hit = torch.gather(sel, 2, idx) & ok
    n_ok = ok.sum(-1)
    return torch.where(n_ok > 0, hit.sum(-1).float() / n_ok.clamp(min=1).float(), torch.ones_like(n_ok, dtype=torch.float32))


def __getattr__(attr: str):
    """``SelectRecorder`` lives in ``sparsattn.eval.recorder`` (the one recorder of the drivers); kept importable here."""
    if attr == "SelectRecorder":
        from .recorder import SelectRecorder

        return SelectRecorder
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
