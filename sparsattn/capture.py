"""capture: q/k/v as seen by a Hugging Face model's attention layers, on real inputs.

``capture_qkv`` runs one forward with the attention swapped for a capture function
(``sparsattn.integrations.hf.attention_swapped``, with transformers' own SDPA mask function) and
restores the previous implementation in all cases. The forward computes exact dense attention (transformers' SDPA path), so the model's
outputs are unchanged. Used for fidelity metrics and method calibration.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

_CAPTURE = "sparsattn_capture"


def _capture_forward(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    store = getattr(module, "_sparsattn_capture", None)
    if store is not None:
        store.append((query.detach(), key.detach(), value.detach()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def capture_qkv(model, input_ids: torch.Tensor, layers: Optional[Iterable[int]] = None, *,
                attention_mask: Optional[torch.Tensor] = None) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """capture_qkv: ``{layer: (q, k, v)}`` of a transformers decoder on ``input_ids``.

    Args:
        model: a transformers causal LM whose attention dispatches through ``AttentionInterface``.
        input_ids: int ``[B, T]``.
        layers: layer indices to capture (default: all attention layers).
        attention_mask: optional 2-D padding mask ``[B, T]``.
    Returns:
        per layer ``q [B, Hq, T, D]`` and ``k, v [B, Hkv, T, D]`` (after RoPE and any q/k norm,
        exactly what the attention function receives; detached, model dtype). No cache is used.
    """
    from .integrations.hf import attention_modules, attention_swapped

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids: expected an integer tensor [batch, tokens], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        raise ValueError(f"attention_mask: expected a [batch, tokens] tensor like input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(getattr(attention_mask, 'shape', ()))}")
    mods = attention_modules(model)
    want = sorted(mods) if layers is None else sorted({int(l) for l in layers})
    bad = [l for l in want if l not in mods]
    if bad:
        raise ValueError(f"layers: unknown layer index(es) {bad}; the model's attention layers are {sorted(mods)}")
    stores = {l: [] for l in want}
    try:
        for l in want:
            mods[l].__dict__["_sparsattn_capture"] = stores[l]
        with attention_swapped(model, _CAPTURE, _capture_forward, modules=mods), torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for l in want:
            mods[l].__dict__.pop("_sparsattn_capture", None)
    out = {}
    for l in want:
        if len(stores[l]) != 1:
            raise RuntimeError(f"layer {l}: expected one attention call during the forward, saw {len(stores[l])}")
        out[l] = stores[l][0]
    return out
