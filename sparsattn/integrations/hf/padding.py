"""hf.padding: helpers for padded batches (left/right alignment of rows, token picks, masked dense SDPA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...patterns import TokenPattern


def _left_to_right(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] with sequence b in rows [T - lens[b], T) -> rows [0, lens[b]) (rest zero)."""
    B, H, T, D = x.shape
    pad = (T - lens.long())[:, None]
    idx = torch.arange(T, device=x.device)[None, :] + pad
    valid = idx < T
    idx = idx.clamp(max=T - 1)
    out = x.gather(2, idx[:, None, :, None].expand(B, H, T, D))
    return out * valid[:, None, :, None].to(x.dtype)


def _shift_left(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [B, H, T, D]`` moved ``pad[b]`` slots to the front (left padding -> right padding)."""
    T = x.shape[2]
    src = (torch.arange(T, device=x.device)[None, :] + pad[:, None]) % T  # [B, T]
    return torch.gather(x, 2, src[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _unshift_tokens(tp: TokenPattern, pad: torch.Tensor, Tk: int) -> TokenPattern:
    """Token picks made on right-aligned rows (``_shift_left``) -> slots of the left-padded cache."""
    m = tp.to_token_mask()  # [B or 1, H, Tk]
    m = m.expand(pad.shape[0], *m.shape[1:]) if m.shape[0] != pad.shape[0] else m
    src = (torch.arange(Tk, device=m.device)[None, :] - pad[:, None]) % Tk  # slot j held row position j - pad
    return TokenPattern.from_mask(torch.gather(m, 2, src[:, None, :].expand(-1, m.shape[1], -1)), kv_len=Tk)


def _clip_tokens(tp: TokenPattern, lo: torch.Tensor, B: int, Tk: int) -> TokenPattern:
    """Drop selected tokens below ``lo[b]`` (left padding / outside the window); page_size becomes 1."""
    m = tp.to_token_mask()
    m = m.expand(B, *m.shape[1:]) if m.shape[0] != B else m
    keep = torch.arange(Tk, device=lo.device)[None, :] >= lo[:, None]
    return TokenPattern.from_mask(m & keep[:, None, :], kv_len=Tk)


def _dense_masked(q, k, v, keep: torch.Tensor, scale, softcap=None, sinks=None) -> torch.Tensor:
    """Dense SDPA with a boolean keep-mask ``[B|1, 1|H, Tq, Tk]``; rows without any key give zeros.
    With ``softcap`` / ``sinks`` (Gemma 2 / gpt-oss, see ``sparsattn.attention``) plain torch in float32."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    if softcap is not None or sinks is not None:
        return _dense_logits(q, k, v, keep, scale, softcap, sinks)
    if keep.dtype != torch.bool:  # additive float mask, as transformers' eager/sdpa paths accept
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep.to(q.dtype), scale=scale)
    any_row = keep.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | ~any_row, scale=scale)
    return out * any_row.to(out.dtype)


def _dense_logits(q, k, v, keep: torch.Tensor, scale, softcap, sinks) -> torch.Tensor:
    """Masked dense attention with soft-capped scores and sink logits, float32 (k, v already per query head)."""
    from ...kernels.block_sparse.reference import apply_softcap_sinks

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if keep.dtype != torch.bool:  # additive mask: added after the cap, as transformers' eager attention does
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s, softcap, keep = s + keep.float(), None, torch.ones((), dtype=torch.bool, device=s.device)
    p, _ = apply_softcap_sinks(s, keep.expand(s.shape), softcap, sinks)
    return torch.matmul(p, v.float()).to(q.dtype)
