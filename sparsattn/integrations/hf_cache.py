"""SparseCache: a transformers ``DynamicCache`` that sparse decode methods and KV policies plug into.

* ``state``: a dict that lives as long as the cache (one generation) and is passed to methods as
  ``SelectContext.state`` (cross-step state: TidalDecode positions, Recycled Attention's top-k...).
* Left padding (batched generation): the number of padding slots at the front of each row is
  tracked per layer, from the 2-D ``attention_mask`` of the first forward.
* ``policy``: an optional KV policy (memory compression / eviction). After each layer's append
  (the prefill, then every decode step) the cache calls
  ``keys, values = policy.compress(layer_idx, keys, values, ctx)`` on the *stored* tensors
  ``[B, Hkv, T, D]``; the current step's attention still sees the uncompressed keys, later steps
  see the compressed ones. ``ctx`` is a ``PolicyContext``: rows are left-padded, sequence b's valid
  tokens are the last ``ctx.kv_lens[b]``; a policy that keeps the padding layout but changes the
  number of valid tokens per row sets ``ctx.kv_lens`` to the new counts (default: the padding is
  assumed untouched, i.e. new valid length = new T - old padding). No policy = unchanged
  ``DynamicCache`` behaviour. Token positions (RoPE) keep counting the tokens seen, not stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers import DynamicCache


@dataclass
class PolicyContext:
    """PolicyContext: what a KV policy's ``compress`` receives besides the tensors.

    Attributes:
        layer: layer index.
        phase: "prefill" (first append of the layer) or "decode".
        kv_lens: int32 ``[B]`` valid (non-padding) tokens at the end of each row; a policy may
            replace it with the counts after compression.
        n_new: tokens appended in this step.
        seen: tokens appended to this layer so far (including this step and padding slots).
        cache: the ``SparseCache``.
        extras: free-form.
    """

    layer: int
    phase: str
    kv_lens: torch.Tensor
    n_new: int
    seen: int
    cache: Any
    extras: dict = field(default_factory=dict)


class SparseCache(DynamicCache):
    """SparseCache: ``DynamicCache`` with method state, left-padding tracking and a KV-policy hook.

    Args: those of ``transformers.DynamicCache`` (e.g. ``config=model.config``), plus
        policy: optional object with ``compress(layer_idx, keys, values, ctx) -> (keys, values)``.
    Use: ``model.generate(..., past_key_values=SparseCache(config=model.config, policy=...))``.
    """

    def __init__(self, *args, policy=None, **kwargs):
        super().__init__(*args, **kwargs)
        if policy is not None and not callable(getattr(policy, "compress", None)):
            raise ValueError(f"policy: expected an object with a compress(layer_idx, keys, values, ctx) method, "
                             f"got {type(policy).__name__}")
        self.policy = policy
        self.state: dict = {}
        self._mask2d: Optional[torch.Tensor] = None
        self._pad_stored: dict[int, torch.Tensor] = {}
        self._pad_attn: dict[int, torch.Tensor] = {}
        self._seen: dict[int, int] = {}
        self._compressed: set[int] = set()

    # -- called by the integration ----------------------------------------------------------------
    def begin_forward(self, attention_mask_2d: Optional[torch.Tensor]) -> None:
        """Record the 2-D padding mask of the forward that is starting (integration hook)."""
        self._mask2d = attention_mask_2d

    def is_compressed(self, layer_idx: int) -> bool:
        """Whether the policy changed the stored length of ``layer_idx`` (lengths then come from here)."""
        return layer_idx in self._compressed

    def attention_pad(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Left-padding slots ``[B]`` of the keys returned by the last ``update`` of ``layer_idx``."""
        return self._pad_attn.get(layer_idx)

    def _pad_from_mask(self, B: int, T: int, device) -> torch.Tensor:
        m = self._mask2d
        if m is None:
            return torch.zeros(B, dtype=torch.long, device=device)
        if m.shape[0] != B or m.shape[1] < T:
            raise ValueError(f"attention_mask: expected a 2-D mask [{B}, >= {T}], got {tuple(m.shape)}")
        sl = m[:, m.shape[1] - T:].to(device=device, dtype=torch.bool)
        lens = sl.sum(-1)
        if self.policy is not None:
            ar = torch.arange(T, device=device)[None, :]
            if not bool((sl == (ar >= T - lens[:, None])).all()):
                raise ValueError("attention_mask: SparseCache with a policy supports left padding only "
                                 "(padding slots first, then the tokens)")
        return (T - lens).long()

    # -- Cache API ----------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        n_new = key_states.shape[-2]
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        B, Tret = keys.shape[0], keys.shape[-2]
        prev = self._pad_stored.get(layer_idx)
        pad = self._pad_from_mask(B, Tret, keys.device) if prev is None else prev
        self._pad_attn[layer_idx] = pad
        seen = self._seen.get(layer_idx, 0) + n_new
        self._seen[layer_idx] = seen
        layer = self.layers[layer_idx]
        stored = layer.keys.shape[-2]
        pad_st = (pad - (Tret - stored)).clamp(min=0)  # sliding layers drop their oldest slots
        if self.policy is not None:
            kl = (stored - pad_st).to(torch.int32)
            ctx = PolicyContext(layer=layer_idx, phase="prefill" if prev is None else "decode", kv_lens=kl,
                                n_new=n_new, seen=seen, cache=self)
            k2, v2 = self.policy.compress(layer_idx, layer.keys, layer.values, ctx)
            for name, t, ref in (("keys", k2, layer.keys), ("values", v2, layer.values)):
                if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:2] != ref.shape[:2] \
                        or t.shape[-1] != ref.shape[-1]:
                    raise ValueError(f"policy.compress: {name}: expected [B={ref.shape[0]}, H={ref.shape[1]}, T, "
                                     f"D={ref.shape[-1]}], got {getattr(t, 'shape', type(t).__name__)}")
            if k2.shape[-2] != v2.shape[-2]:
                raise ValueError(f"policy.compress: keys and values lengths differ ({k2.shape[-2]} vs {v2.shape[-2]})")
            new_T = k2.shape[-2]
            if ctx.kv_lens is kl:
                kl_new = new_T - pad_st
            else:
                kl_new = torch.as_tensor(ctx.kv_lens, device=keys.device).long()
            if bool((kl_new < 0).any()) or bool((kl_new > new_T).any()):
                raise ValueError(f"policy.compress: valid lengths {kl_new.tolist()} do not fit {new_T} stored tokens "
                                 "(a policy that drops padding slots must set ctx.kv_lens)")
            if new_T != stored or k2 is not layer.keys:
                self._compressed.add(layer_idx)
            layer.keys, layer.values = k2, v2
            pad_st = (new_T - kl_new).long()
        self._pad_stored[layer_idx] = pad_st
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by ``layer_idx`` (not stored: positions keep counting after compression)."""
        if layer_idx in self._compressed:
            return self._seen[layer_idx]
        return super().get_seq_length(layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        for d in (self._pad_stored, self._pad_attn):
            for k_, v_ in d.items():
                d[k_] = v_.index_select(0, beam_idx.to(v_.device))
