"""SparseCache: a transformers ``DynamicCache`` that sparse decode methods and KV policies plug into.

* ``state``: a dict that lives as long as the cache (one generation) and is passed to methods as
  ``SelectContext.state`` (cross-step state: TidalDecode positions, Recycled Attention's top-k...).
* Left padding (batched generation): the number of padding slots at the front of each row is
  tracked per layer and per KV head, from the 2-D ``attention_mask`` of the first forward.
* ``policy``: an optional KV policy (memory compression / eviction), either a ``sparsattn.kv``
  policy (``StreamingLLMPolicy``, ``RazorAttentionPolicy``, ``MoAPolicy``; wrapped by
  ``sparsattn.kv.as_cache_policy``, whose options ``every`` / ``signals`` are reached by wrapping
  explicitly) or any object with ``compress(layer_idx, keys, values, ctx) -> (keys, values)``.
  After each layer's append (the prefill, then every decode step) the cache calls ``compress`` on
  the *stored* tensors ``[B, Hkv, T, D]``; the current step's attention still sees the
  uncompressed keys, later steps see the compressed ones. Rows are left-padded: row (b, h) holds
  its valid slots at the end. ``ctx`` is a ``PolicyContext`` with ``kv_lens [B]`` (valid slots
  per sequence), ``head_lens [B, Hkv]`` (per head) and ``log_weight`` (None or ``[B, Hkv, T]``:
  ``log n`` on a slot that stands for n merged tokens). A policy that changes the number of valid
  slots sets ``ctx.head_lens`` (per head) or ``ctx.kv_lens`` (per sequence) to the new counts
  (default: the padding is assumed untouched), sets ``ctx.log_weight`` when it writes merged slots,
  and may set ``ctx.report`` (kept in ``policy_reports[layer]``). No policy = unchanged
  ``DynamicCache`` behaviour. Token positions (RoPE) keep counting the tokens seen, not stored.
* Per-head lengths or log-weights cannot be expressed by a per-sequence padding mask: attention
  on such a layer goes through ``attend(layer_idx, q, k, v, ...)`` (exact: the sparse decode
  kernel over the valid slots of every (batch, head) with the log-weights, or dense attention
  with an additive mask for several queries). ``sparsattn.integrations.hf`` calls it;
  ``attention_pad`` refuses such a layer (ValueError) rather than let a caller mask it wrongly.
* A cache with a policy must be driven by a model patched with ``sparsattn.integrations.hf.patch``
  (the patched attention reads the compressed layout; transformers' own masks cannot).
* Memory: ``nbytes(layer)`` = bytes of the stored K/V (padding slots included) + per-slot
  log-weights + the policy's per-slot state; ``policy_reports`` = the policy's own accounting
  (``bytes_before`` / ``bytes_after`` of the K/V slots in use, slots before / after).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..kv.adapter import as_cache_policy
from ..patterns import TokenPattern


@dataclass
class PolicyContext:
    """PolicyContext: what a KV policy's ``compress`` receives besides the tensors.

    Attributes:
        layer: layer index.
        phase: "prefill" (first append of the layer) or "decode".
        kv_lens: int32 ``[B]`` valid (non-padding) slots at the end of each row (the longest head's
            when heads differ); a policy may replace it with the counts after compression.
        n_new: tokens appended in this step.
        seen: tokens appended to this layer so far (including this step and padding slots).
        cache: the ``SparseCache``.
        extras: free-form; ``extras["sliding"]`` tells whether the layer is a sliding-window layer.
        head_lens: int32 ``[B, Hkv]`` valid slots at the end of each (batch, head) row; a policy that
            keeps different counts per head replaces it.
        log_weight: None or float32 ``[B, Hkv, T]`` per-slot log-weights (0 for plain tokens); a
            policy that writes merged slots sets it for the tensors it returns.
        report: optional dict a policy sets (bytes kept...), stored in ``cache.policy_reports``.
    """

    layer: int
    phase: str
    kv_lens: torch.Tensor
    n_new: int
    seen: int
    cache: Any
    extras: dict = field(default_factory=dict)
    head_lens: Optional[torch.Tensor] = None
    log_weight: Optional[torch.Tensor] = None
    report: Optional[dict] = None


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class SparseCache(DynamicCache):
    """SparseCache: ``DynamicCache`` with method state, left-padding tracking and a KV-policy hook.

    Args: those of ``transformers.DynamicCache`` (e.g. ``config=model.config``), plus
        policy: optional ``sparsattn.kv`` policy (``StreamingLLMPolicy``...) or object with
            ``compress(layer_idx, keys, values, ctx) -> (keys, values)`` (see the module docstring).
    Use: ``model.generate(..., past_key_values=SparseCache(config=model.config, policy=...))`` on a
    model patched with ``sparsattn.integrations.hf.patch``.
    """

    def __init__(self, *args, policy=None, **kwargs):
        super().__init__(*args, **kwargs)
        if policy is not None:
            try:
                policy = as_cache_policy(policy)
            except ValueError as e:
                raise ValueError(f"policy: expected an object with a compress(layer_idx, keys, values, ctx) method "
                                 f"or a sparsattn.kv policy ({e})") from None
        self.policy = policy
        self.state: dict = {}
        self.policy_state: dict[int, dict] = {}
        self.policy_reports: dict[int, dict] = {}
        self._mask2d: Optional[torch.Tensor] = None
        self._driven = False
        self._pad_stored: dict[int, torch.Tensor] = {}  # [B, Hkv] padding slots in front of each stored row
        self._pad_attn: dict[int, torch.Tensor] = {}  # same, for the keys returned by the last update
        self._lw_stored: dict[int, Optional[torch.Tensor]] = {}
        self._lw_attn: dict[int, Optional[torch.Tensor]] = {}
        self._seen: dict[int, int] = {}
        self._compressed: set[int] = set()

    # -- called by the integration ----------------------------------------------------------------
    def begin_forward(self, attention_mask_2d: Optional[torch.Tensor]) -> None:
        """Record the 2-D padding mask of the forward that is starting (integration hook)."""
        self._mask2d = attention_mask_2d
        self._driven = True

    def is_compressed(self, layer_idx: int) -> bool:
        """Whether the policy changed the stored length of ``layer_idx`` (lengths then come from here)."""
        return layer_idx in self._compressed

    def needs_attend(self, layer_idx: int) -> bool:
        """Whether the keys of the last update of ``layer_idx`` have per-head lengths or log-weights
        (then attention must go through ``attend``)."""
        pad = self._pad_attn.get(layer_idx)
        if pad is None:
            return False
        return self._lw_attn.get(layer_idx) is not None or bool((pad != pad[:, :1]).any())

    def attention_pad(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Left-padding slots ``[B]`` of the keys returned by the last ``update`` of ``layer_idx``."""
        pad = self._pad_attn.get(layer_idx)
        if pad is None:
            return None
        if self.needs_attend(layer_idx):
            raise ValueError(f"layer {layer_idx}: the KV policy left per-head lengths or merged-slot weights that a "
                             "per-sequence padding cannot express; attend through SparseCache.attend() "
                             "(sparsattn.integrations.hf does)")
        return pad[:, 0]

    def head_pad(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Padding slots ``[B, Hkv]`` in front of each stored row of ``layer_idx`` (None before its first update)."""
        return self._pad_stored.get(layer_idx)

    def head_lens(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Slots kept ``[B, Hkv]`` per (batch, KV head) in the stored rows of ``layer_idx`` (merged slots count 1)."""
        pad = self._pad_stored.get(layer_idx)
        return None if pad is None else self.layers[layer_idx].keys.shape[-2] - pad

    def log_weights(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Per-slot log-weights ``[B, Hkv, T]`` of the stored rows (None: every slot is one token)."""
        return self._lw_stored.get(layer_idx)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: Optional[float] = None, backend: Optional[str] = None) -> Optional[torch.Tensor]:
        """Attention of ``q [B, Hq, Tq, D]`` on the keys/values returned by the last ``update`` of
        ``layer_idx``, honouring per-(batch, head) valid slots and merged-slot log-weights; the Tq
        queries are the last Tq slots (causal). Returns ``[B, Hq, Tq, D]``, or None when the layer
        has the plain layout (per-sequence left padding, no weights): the caller's own path applies.

        One query: ``sparse_decode_attention`` over each row's valid slots with the log-weights
        (``backend`` "triton"/"reference", None = automatic). Several: dense SDPA with an additive
        mask (-inf on padding and future slots, the log-weights on the others; float32 when there are
        log-weights). Such a layer is attended over every slot the policy kept: a decode method given
        to ``hf.patch`` does not further select on it."""
        if not self.needs_attend(layer_idx):
            return None
        pad = self._pad_attn[layer_idx]
        lw = self._lw_attn.get(layer_idx)
        B, Hq, Tq, D = q.shape
        H, T = k.shape[1], k.shape[2]
        if tuple(pad.shape) != (B, H) or v.shape != k.shape or k.shape[0] != B or Hq % H:
            raise ValueError(f"k: expected [B={B}, Hkv={pad.shape[1]}, T, D] (the last update of layer {layer_idx}), "
                             f"got {tuple(k.shape)}")
        if lw is not None and lw.shape[-1] != T:
            raise ValueError(f"k: expected {lw.shape[-1]} slots (the last update of layer {layer_idx}), got {T}")
        pad = pad.to(k.device)
        if Tq == 1:
            from ..kernels.sparse_decode import sparse_decode_attention

            idx = (pad[..., None] + torch.arange(T, device=k.device)).clamp(max=T - 1)
            tp = TokenPattern(idx.to(torch.int32).contiguous(), (T - pad).to(torch.int32).contiguous(), T)
            lws = None if lw is None else torch.gather(lw.to(k.device), 2, idx)
            be = backend if backend in ("triton", "reference") else None
            return sparse_decode_attention(q[:, :, 0], k, v, tp, scale=scale, log_weight=lws, backend=be)[:, :, None]
        j = torch.arange(T, device=k.device)
        i = torch.arange(Tq, device=k.device)[:, None] + (T - Tq)
        keep = (j[None, None, None, :] >= pad[:, :, None, None]) & (j <= i)[None, None]  # [B, H, Tq, T]
        w = torch.zeros((), device=k.device) if lw is None else lw.to(k.device).float()[:, :, None, :]
        bias = torch.where(keep, w, torch.full((), float("-inf"), device=k.device))
        g = Hq // H
        dt = q.dtype if lw is None else torch.float32  # log-weights (log n) need more than 16-bit precision
        bias = bias.repeat_interleave(g, 1).to(dt)
        kk, vv = (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)) if g > 1 else (k, v)
        out = F.scaled_dot_product_attention(q.to(dt), kk.to(dt), vv.to(dt), attn_mask=bias, scale=scale)
        return out.to(q.dtype)

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

    # -- memory -------------------------------------------------------------------------------------
    def nbytes(self, layer_idx: Optional[int] = None) -> int:
        """Bytes kept by ``layer_idx`` (default: all layers): stored K/V tensors (padding slots
        included), per-slot log-weights and the policy's per-slot state."""
        total = 0
        for i in ([layer_idx] if layer_idx is not None else range(len(self.layers))):
            layer = self.layers[i]
            total += _nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
            total += _nbytes(self._lw_stored.get(i))
            total += sum(_nbytes(t) for t in self.policy_state.get(i, {}).values())
        return total

    # -- Cache API ----------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.policy is not None and not self._driven:
            raise ValueError("policy: a SparseCache with a KV policy must be driven by a model patched with "
                             "sparsattn.integrations.hf.patch (transformers' own masks do not see the compressed "
                             "layout)")
        n_new = key_states.shape[-2]
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        B, H, Tret = keys.shape[0], keys.shape[1], keys.shape[-2]
        dev = keys.device
        prev = self._pad_stored.get(layer_idx)
        if prev is None:
            pad = self._pad_from_mask(B, Tret, dev)[:, None].expand(B, H).contiguous()
        else:
            pad = prev
        lw_prev = self._lw_stored.get(layer_idx)
        lw = None if lw_prev is None else torch.cat([lw_prev, lw_prev.new_zeros(B, H, n_new)], -1)
        self._pad_attn[layer_idx] = pad
        self._lw_attn[layer_idx] = lw
        seen = self._seen.get(layer_idx, 0) + n_new
        self._seen[layer_idx] = seen
        layer = self.layers[layer_idx]
        stored = layer.keys.shape[-2]
        drop = Tret - stored  # sliding layers drop their oldest slots
        pad_st = (pad - drop).clamp(min=0)
        lw_st = None if lw is None else lw[..., drop:]
        if self.policy is not None:
            hl = (stored - pad_st).to(torch.int32)
            kl = hl.amax(1) if H else torch.zeros(B, dtype=torch.int32, device=dev)
            ctx = PolicyContext(layer=layer_idx, phase="prefill" if prev is None else "decode", kv_lens=kl,
                                n_new=n_new, seen=seen, cache=self, head_lens=hl, log_weight=lw_st,
                                extras={"sliding": bool(getattr(layer, "is_sliding", False))})
            k2, v2 = self.policy.compress(layer_idx, layer.keys, layer.values, ctx)
            for name, t, ref in (("keys", k2, layer.keys), ("values", v2, layer.values)):
                if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:2] != ref.shape[:2] \
                        or t.shape[-1] != ref.shape[-1]:
                    raise ValueError(f"policy.compress: {name}: expected [B={ref.shape[0]}, H={ref.shape[1]}, T, "
                                     f"D={ref.shape[-1]}], got {getattr(t, 'shape', type(t).__name__)}")
            if k2.shape[-2] != v2.shape[-2]:
                raise ValueError(f"policy.compress: keys and values lengths differ ({k2.shape[-2]} vs {v2.shape[-2]})")
            new_T = k2.shape[-2]
            unchanged = k2 is layer.keys and new_T == stored
            if ctx.head_lens is not hl:
                hl_new = torch.as_tensor(ctx.head_lens, device=dev).long()
                if tuple(hl_new.shape) != (B, H):
                    raise ValueError(f"policy.compress: ctx.head_lens: expected [{B}, {H}], got {tuple(hl_new.shape)}")
            elif ctx.kv_lens is not kl:
                hl_new = torch.as_tensor(ctx.kv_lens, device=dev).long()[:, None].expand(B, H)
            else:
                hl_new = new_T - pad_st
            if bool((hl_new < 0).any()) or bool((hl_new > new_T).any()):
                raise ValueError(f"policy.compress: valid lengths {hl_new.tolist()} do not fit {new_T} stored tokens "
                                 "(a policy that drops padding slots must set ctx.kv_lens or ctx.head_lens)")
            if ctx.log_weight is not lw_st:
                lw_new = ctx.log_weight
                if lw_new is not None and (not isinstance(lw_new, torch.Tensor) or tuple(lw_new.shape) != (B, H, new_T)):
                    raise ValueError(f"policy.compress: ctx.log_weight: expected None or [{B}, {H}, {new_T}], got "
                                     f"{getattr(lw_new, 'shape', type(lw_new).__name__)}")
            elif lw_st is None or unchanged:
                lw_new = lw_st
            else:
                raise ValueError("policy.compress: changed a layer that holds merged-slot log-weights without "
                                 "setting ctx.log_weight for the tensors it returned")
            if not unchanged or bool((hl_new != hl).any()):
                self._compressed.add(layer_idx)
            layer.keys, layer.values = k2, v2
            pad_st = (new_T - hl_new).long()
            lw_st = None if lw_new is None else lw_new.float()
            if ctx.report is not None:
                self.policy_reports[layer_idx] = ctx.report
        self._pad_stored[layer_idx] = pad_st
        self._lw_stored[layer_idx] = lw_st
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by ``layer_idx`` (not stored: positions keep counting after compression)."""
        if layer_idx in self._compressed:
            return self._seen[layer_idx]
        return super().get_seq_length(layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        for d in (self._pad_stored, self._pad_attn, self._lw_stored, self._lw_attn):
            for k_, v_ in d.items():
                if v_ is not None:
                    d[k_] = v_.index_select(0, beam_idx.to(v_.device))
        for st in self.policy_state.values():
            for k_, v_ in st.items():
                if isinstance(v_, torch.Tensor):
                    st[k_] = v_.index_select(0, beam_idx.to(v_.device))
