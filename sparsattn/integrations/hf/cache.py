"""hf.cache: SparseCache, a transformers ``DynamicCache`` that sparse decode methods and KV policies plug into.

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
  with an additive mask for several queries; Gemma 2's ``softcap`` and gpt-oss's ``sinks`` are
  applied as in the kernels, several queries then in a float32 masked softmax). ``sparsattn.integrations.hf`` calls it;
  ``attention_pad`` refuses such a layer (ValueError) rather than let a caller mask it wrongly.
* A cache with a policy must be driven by a model patched with ``sparsattn.integrations.hf.patch``
  (the patched attention reads the compressed layout; transformers' own masks cannot).
* Head groups (``group_waste``, default 0.1): when a policy leaves rows of different lengths per
  KV head (RazorAttention's retrieval heads keep everything, MoA's spans differ per head) the layer
  is stored in ``sparsattn.kv.store.HeadGroupStore``, the one head-group storage (the one of
  ``sparsattn.kv.KVCache``, grouped by ``sparsattn.kv.groups.head_groups`` on each head's longest row
  over the batch): each group is its own ``[B, H_g, cap_g, D]`` tensor, ``cap_g`` its longest row, so
  memory follows the per-head lengths. ``group_waste=1`` never splits (the single padded tensor).
  Such a layer (``self.layers[i]`` is a ``GroupedLayer``):
  - ``update`` appends the new tokens to every row of the store and returns *placeholders*
    (``GroupedKV``: shape/dtype/device of the padded layout, no data; any other use raises
    ValueError), because the groups cannot be one tensor. ``attend(layer_idx, q, k, v)`` given those
    placeholders reads the store: one query = the decode kernel once per group on that group's query
    heads (exact: a query head only reads its own KV head), several = dense SDPA per group. A second
    ``attend`` of the same update raises ValueError.
  - the policy (and a sliding layer's window) runs on the store *after* that attention (or at the next
    update, forward or beam reorder, whichever comes first; reads in between show the appended rows): a ``sparsattn.kv`` policy edits the
    store in place (``CachePolicy.compress_store``: no padded copy); a plain ``compress`` object gets
    materialised left-padded rows (its interface) and what it returns is re-grouped. When the heads
    come back to similar lengths the layer becomes one padded tensor again.
  - ``layers[i].keys`` / ``.values``, ``head_pad``, ``log_weights`` return *materialised* padded
    tensors (new tensors, not views of the storage); ``head_lens``, ``get_seq_length``,
    ``reorder_cache`` (beam search), ``nbytes``, sliding-window layers and offloading work on the
    store; ``crop``, ``batch_repeat_interleave``, ``batch_select_indices`` and ``reset`` refuse a
    grouped layer (ValueError).
* Memory: ``nbytes(layer)`` = bytes of the stored K/V (padding slots included; per head group on a
  grouped layer) + per-slot log-weights + per-slot positions (in the store of a grouped layer, in the
  policy's state otherwise) + the policy's other state; ``policy_reports`` = the
  policy's own accounting (``bytes_before`` / ``bytes_after`` of the K/V slots in use, slots
  before / after).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers import DynamicCache

from ...kv.adapter import CachePolicy, as_cache_policy
from ...kv.groups import head_groups
from ...kv.store import HeadGroupStore, left_to_slots
from ...kv.store_attend import attend_rows
from .cache_groups import GroupedKV, GroupedLayer, HeadGroup  # noqa: F401 (HeadGroup re-exported)


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


@dataclass
class _Fresh:
    """The last update of a grouped layer: the placeholders it returned, whether its rows were attended
    (or the layer moved on), and the pending policy run ``(n_new, seen)`` (None once done)."""

    k: torch.Tensor
    v: torch.Tensor
    attended: bool = False
    pending: Optional[tuple] = None


class SparseCache(DynamicCache):
    """SparseCache: ``DynamicCache`` with method state, left-padding tracking and a KV-policy hook.

    Args: those of ``transformers.DynamicCache`` (e.g. ``config=model.config``), plus
        policy: optional ``sparsattn.kv`` policy (``StreamingLLMPolicy``...) or object with
            ``compress(layer_idx, keys, values, ctx) -> (keys, values)`` (see the module docstring).
        group_waste: the largest fraction of a head group's storage that may be padding when a
            layer whose heads keep different lengths is stored as head groups (default 0.1; 1 =
            never split, the single padded tensor; 0 = a group per distinct length). The rule of
            ``sparsattn.kv.KVCache`` (``sparsattn.kv.groups.head_groups``).
    Use: ``model.generate(..., past_key_values=SparseCache(config=model.config, policy=...))`` on a
    model patched with ``sparsattn.integrations.hf.patch``.
    """

    def __init__(self, *args, policy=None, group_waste: float = 0.1, **kwargs):
        if isinstance(group_waste, bool) or not isinstance(group_waste, (int, float)) or not 0 <= group_waste <= 1:
            raise ValueError(f"group_waste: expected a number in [0, 1], got {group_waste!r}")
        super().__init__(*args, **kwargs)
        if policy is not None:
            try:
                policy = as_cache_policy(policy)
            except ValueError as e:
                raise ValueError(f"policy: expected an object with a compress(layer_idx, keys, values, ctx) method "
                                 f"or a sparsattn.kv policy ({e})") from None
        self.policy = policy
        self.group_waste = float(group_waste)
        self.state: dict = {}
        self.policy_state: dict[int, dict] = {}
        self.policy_reports: dict[int, dict] = {}
        self._mask2d: Optional[torch.Tensor] = None
        self._driven = False
        self._pad_stored: dict[int, torch.Tensor] = {}  # [B, Hkv] padding slots in front of each stored row
        self._pad_attn: dict[int, torch.Tensor] = {}  # same, for the keys returned by the last update
        self._lw_stored: dict[int, Optional[torch.Tensor]] = {}
        self._lw_attn: dict[int, Optional[torch.Tensor]] = {}
        self._fresh: dict[int, _Fresh] = {}  # grouped layers: the last update (placeholders, rows to attend)
        self._seen: dict[int, int] = {}
        self._compressed: set[int] = set()

    # -- called by the integration ----------------------------------------------------------------
    def begin_forward(self, attention_mask_2d: Optional[torch.Tensor]) -> None:
        """Record the 2-D padding mask of the forward that is starting (integration hook)."""
        self._mask2d = attention_mask_2d
        self._driven = True
        for i in list(self._fresh):  # rows of the previous forward nobody attended: let them go
            self._settle(i)

    def is_compressed(self, layer_idx: int) -> bool:
        """Whether the policy changed the stored length of ``layer_idx`` (lengths then come from here)."""
        return layer_idx in self._compressed

    def _grouped(self, layer_idx: int) -> Optional[GroupedLayer]:
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], GroupedLayer):
            return self.layers[layer_idx]
        return None

    def head_groups(self, layer_idx: int) -> Optional[list]:
        """Head groups of ``layer_idx`` as ``[(kv head ids, capacity), ...]``, None when the layer is one
        padded tensor."""
        gl = self._grouped(layer_idx)
        return None if gl is None else [(g.heads.tolist(), g.cap) for g in gl.groups]

    def needs_attend(self, layer_idx: int) -> bool:
        """Whether the keys of the last update of ``layer_idx`` have per-head lengths or log-weights or are
        head groups (then attention must go through ``attend``)."""
        if layer_idx in self._fresh:
            return True
        pad = self._pad_attn.get(layer_idx)
        if pad is None:
            return False
        return self._lw_attn.get(layer_idx) is not None or bool((pad != pad[:, :1]).any())

    def attention_pad(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Left-padding slots ``[B]`` of the keys returned by the last ``update`` of ``layer_idx``."""
        if self.needs_attend(layer_idx):
            raise ValueError(f"layer {layer_idx}: the KV policy left per-head lengths or merged-slot weights that a "
                             "per-sequence padding cannot express; attend through SparseCache.attend() "
                             "(sparsattn.integrations.hf does)")
        pad = self._pad_attn.get(layer_idx)
        return None if pad is None else pad[:, 0]

    def head_pad(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Padding slots ``[B, Hkv]`` in front of each stored row of ``layer_idx`` (None before its first update;
        on a grouped layer: of the materialised padded view)."""
        gl = self._grouped(layer_idx)
        if gl is not None:
            return self._grouped_pad(gl)
        return self._pad_stored.get(layer_idx)

    @staticmethod
    def _grouped_pad(gl: GroupedLayer) -> torch.Tensor:
        return gl.slots() - gl.store.lengths

    def head_lens(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Slots kept ``[B, Hkv]`` per (batch, KV head) in the stored rows of ``layer_idx`` (merged slots count 1)."""
        gl = self._grouped(layer_idx)
        if gl is not None:
                return gl.store.lengths.clone()
        pad = self._pad_stored.get(layer_idx)
        return None if pad is None else self.layers[layer_idx].keys.shape[-2] - pad

    def log_weights(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Per-slot log-weights ``[B, Hkv, T]`` of the stored rows (None: every slot is one token; on a grouped
        layer a materialised padded copy)."""
        gl = self._grouped(layer_idx)
        if gl is not None:
                return gl.store.padded("log_weight", left=True)
        return self._lw_stored.get(layer_idx)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: Optional[float] = None, backend: Optional[str] = None, softcap: Optional[float] = None,
               sinks: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Attention of ``q [B, Hq, Tq, D]`` on the keys/values returned by the last ``update`` of
        ``layer_idx``, honouring per-(batch, head) valid slots and merged-slot log-weights; the Tq
        queries are the last Tq slots (causal). Returns ``[B, Hq, Tq, D]``, or None when the layer
        has the plain layout (per-sequence left padding, no weights): the caller's own path applies.

        One query: ``sparse_decode_attention`` over each row's valid slots with the log-weights
        (``backend`` "triton"/"reference", None = automatic). Several: dense SDPA with an additive
        mask (-inf on padding and future slots, the log-weights on the others; float32 when there are
        log-weights). Such a layer is attended over every slot the policy kept: a decode method given
        to ``hf.patch`` does not further select on it. On a layer stored as head groups ``k``/``v``
        must be the ``GroupedKV`` placeholders of the last update; the groups are read (once per
        group on its query heads) and then released (a second call raises ValueError).
        ``softcap`` (Gemma 2's logit cap) and ``sinks`` (gpt-oss's learned sink logits, float ``[Hq]``)
        apply as in the kernels: the decode kernel takes them for one query; several queries are then
        a float32 masked softmax (cap, then the log-weight and the mask; the sink in the denominator)."""
        fresh = self._fresh.get(layer_idx)
        if fresh is not None:
            if k is not fresh.k or v is not fresh.v:
                raise ValueError(f"k, v: expected the GroupedKV placeholders returned by the last update of layer "
                                 f"{layer_idx} (stored as head groups), got {type(k).__name__} {tuple(k.shape)}")
            if fresh.attended:
                raise ValueError(f"layer {layer_idx}: the rows of the last update were already attended (or a new "
                                 "forward began); attend once per update")
            fresh.attended = True
            out = self._grouped(layer_idx).store.attend_causal(q, scale=scale, backend=backend, softcap=softcap,
                                                               sinks=sinks)
            self._settle(layer_idx)  # the policy and the sliding window run after the attention
            return out
        if isinstance(k, GroupedKV) or isinstance(v, GroupedKV):
            GroupedKV._refuse(self.attend, (k,))
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
        return attend_rows(q, k, v, T - pad, lw, scale=scale, backend=backend, pad=pad,
                           dense_dtype=q.dtype if lw is None else torch.float32, softcap=softcap, sinks=sinks)

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
        included; per head group on a grouped layer), per-slot log-weights, per-slot positions (the
        store's on a grouped layer) and the policy's state."""
        total = 0
        for i in ([layer_idx] if layer_idx is not None else range(len(self.layers))):
            gl = self._grouped(i)
            if gl is not None:
                total += gl.store.nbytes(meta=False)  # K, V, positions, log-weights of every group
            else:
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
        self._settle(layer_idx)  # a policy run left pending by the previous update (may un-group the layer)
        seen = self._seen.get(layer_idx, 0) + n_new
        self._seen[layer_idx] = seen
        if self._grouped(layer_idx) is not None:
            # positions of the new tokens (kv policies); an attribute, not an update() keyword, so that
            # Cache.update versions without **kwargs pass through
            self.layers[layer_idx].first = self.policy_state.get(layer_idx, {}).get("seen")
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            self._fresh[layer_idx] = _Fresh(keys, values, pending=(n_new, seen))
            self._pad_attn.pop(layer_idx, None)
            self._lw_attn.pop(layer_idx, None)
            return keys, values
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._fresh.pop(layer_idx, None)
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
        layer = self.layers[layer_idx]
        stored = layer.keys.shape[-2]
        drop = Tret - stored  # sliding layers drop their oldest slots
        pad_st = (pad - drop).clamp(min=0)
        lw_st = None if lw is None else lw[..., drop:]
        phase, sliding = "prefill" if prev is None else "decode", bool(getattr(layer, "is_sliding", False))
        if isinstance(self.policy, CachePolicy):  # a sparsattn.kv policy: run on a store of the rows
            ctx = self._ctx(layer_idx, stored - pad_st, lw_st, phase, n_new, seen, sliding)
            store = self.policy.compress_rows(layer_idx, layer.keys, layer.values, ctx)
            if store is None:
                self._pad_stored[layer_idx], self._lw_stored[layer_idx] = pad_st, lw_st
            else:
                self._ran(layer_idx, ctx)
                self._keep(layer_idx, layer, store)
            return keys, values
        if self.policy is None:
            self._pad_stored[layer_idx] = pad_st
            self._lw_stored[layer_idx] = lw_st
            return keys, values
        k2, v2, pad_st, lw_st, changed = self._compress(layer_idx, layer.keys, layer.values, pad_st, lw_st,
                                                        phase, n_new, seen, sliding)
        self._store(layer_idx, k2, v2, pad_st, lw_st, regroup=changed)
        return keys, values

    def _ctx(self, layer_idx: int, head_lens, lw, phase: str, n_new: int, seen: int, sliding: bool) -> PolicyContext:
        B, H = head_lens.shape
        hl = head_lens.to(torch.int32)
        kl = hl.amax(1) if H else torch.zeros(B, dtype=torch.int32, device=hl.device)
        return PolicyContext(layer=layer_idx, phase=phase, kv_lens=kl, n_new=n_new, seen=seen, cache=self,
                             head_lens=hl, log_weight=lw, extras={"sliding": sliding})

    def _ran(self, layer_idx: int, ctx: PolicyContext) -> None:
        self._compressed.add(layer_idx)
        if ctx.report is not None:
            self.policy_reports[layer_idx] = ctx.report

    def _keep(self, layer_idx: int, layer, store: HeadGroupStore) -> None:
        """Make ``store`` (after a policy) the layer: grouped when it has several head groups, else the rows
        left-padded into the plain transformers layer ``layer`` (its positions into the policy state)."""
        base = layer.base if isinstance(layer, GroupedLayer) else layer
        if len(store.groups) > 1:
            if not isinstance(layer, GroupedLayer):
                gl = GroupedLayer(base, store, layer_idx)
                self.layers[layer_idx] = gl
                self._pad_stored.pop(layer_idx, None)
                self._lw_stored.pop(layer_idx, None)
            else:
                layer.store = store
            self.policy_state.get(layer_idx, {}).pop("pos", None)  # positions live in the store
            self._compressed.add(layer_idx)
            return
        T = int(store.lengths.max()) if store.lengths.numel() else 0
        k, v, lw = (store.padded(n, left=True, slots=T) for n in ("k", "v", "log_weight"))
        if isinstance(self.policy, CachePolicy):
            self.policy_state.setdefault(layer_idx, {})["pos"] = store.padded("positions", left=True, slots=T)
        base.keys, base.values = k, v
        self.layers[layer_idx] = base
        self._fresh.pop(layer_idx, None)
        self._pad_stored[layer_idx] = (T - store.lengths).long()
        self._lw_stored[layer_idx] = lw

    def _settle(self, layer_idx: int) -> None:
        """Run what an update of a grouped layer left pending (after its attention): the sliding window,
        then the policy on the store; a layer whose heads came back to similar lengths is un-grouped."""
        fresh = self._fresh.get(layer_idx)
        if fresh is None or fresh.pending is None:
            return
        n_new, seen = fresh.pending
        fresh.pending, fresh.attended = None, True
        gl = self._grouped(layer_idx)
        if gl is None:  # pragma: no cover - pending only on grouped layers
            return
        if gl.is_sliding:
            gl.trim_window(self.group_waste)
        st = gl.store
        if isinstance(self.policy, CachePolicy):
            ctx = self._ctx(layer_idx, st.lengths, None, "decode", n_new, seen, gl.is_sliding)
            new = self.policy.compress_store(layer_idx, st, ctx)
            if new is not None:
                self._ran(layer_idx, ctx)
                st = new
        elif self.policy is not None:
            T = st.slots()
            kp, vp = st.padded("k", left=True), st.padded("v", left=True)
            lw = st.padded("log_weight", left=True)
            k2, v2, pad2, lw2, changed = self._compress(layer_idx, kp, vp, T - st.lengths, lw, "decode", n_new, seen,
                                                        gl.is_sliding)
            if changed:
                self._store(layer_idx, k2, v2, pad2, lw2, regroup=True)
                return
        self._keep(layer_idx, gl, st)

    def _compress(self, layer_idx: int, keys, values, pad_st, lw_st, phase: str, n_new: int, seen: int,
                  sliding: bool):
        """Run the policy on the padded rows; returns (keys, values, pad [B, H], log_weight, changed)."""
        B, H, stored = keys.shape[0], keys.shape[1], keys.shape[-2]
        dev = keys.device
        hl = (stored - pad_st).to(torch.int32)
        kl = hl.amax(1) if H else torch.zeros(B, dtype=torch.int32, device=dev)
        ctx = PolicyContext(layer=layer_idx, phase=phase, kv_lens=kl, n_new=n_new, seen=seen, cache=self,
                            head_lens=hl, log_weight=lw_st, extras={"sliding": sliding})
        k2, v2 = self.policy.compress(layer_idx, keys, values, ctx)
        for name, t, ref in (("keys", k2, keys), ("values", v2, values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:2] != ref.shape[:2] \
                    or t.shape[-1] != ref.shape[-1]:
                raise ValueError(f"policy.compress: {name}: expected [B={ref.shape[0]}, H={ref.shape[1]}, T, "
                                 f"D={ref.shape[-1]}], got {getattr(t, 'shape', type(t).__name__)}")
        if k2.shape[-2] != v2.shape[-2]:
            raise ValueError(f"policy.compress: keys and values lengths differ ({k2.shape[-2]} vs {v2.shape[-2]})")
        new_T = k2.shape[-2]
        unchanged = k2 is keys and v2 is values and new_T == stored
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
        same_lens = not bool((hl_new != hl).any())
        if not unchanged or not same_lens:
            self._compressed.add(layer_idx)
        if ctx.report is not None:
            self.policy_reports[layer_idx] = ctx.report
        changed = not (unchanged and same_lens and lw_new is lw_st)
        return k2, v2, (new_T - hl_new).long(), None if lw_new is None else lw_new.float(), changed

    def _store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor,
               lw: Optional[torch.Tensor], *, regroup: bool) -> None:
        """Store what a ``compress`` object returned (left-padded rows): one tensor, or (``regroup`` and the
        heads' lengths differ: ``head_groups``) a ``HeadGroupStore`` of the rows (positions unknown: -1)."""
        layer = self.layers[layer_idx]
        base = layer.base if isinstance(layer, GroupedLayer) else layer
        B, H, T = k.shape[0], k.shape[1], k.shape[2]
        parts = None
        if regroup and B and H > 1:
            parts = head_groups((T - pad).amax(0).tolist(), self.group_waste)  # each head's longest row
        if parts is None or len(parts) <= 1:
            base.keys, base.values = k, v
            self.layers[layer_idx] = base
            self._fresh.pop(layer_idx, None)
            self._pad_stored[layer_idx] = pad
            self._lw_stored[layer_idx] = lw
            return
        n = T - pad
        store = HeadGroupStore.from_rows(left_to_slots(k, n), left_to_slots(v, n), n,
                                         torch.full((B, H, T), -1, dtype=torch.long, device=k.device),
                                         None if lw is None else left_to_slots(lw, n), adopt=True, exact=True)
        store.regroup(self.group_waste)
        self._keep(layer_idx, layer, store)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by ``layer_idx`` (not stored: positions keep counting after compression)."""
        if layer_idx in self._compressed:
            return self._seen[layer_idx]
        return super().get_seq_length(layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for i in list(self._fresh):
            self._settle(i)
        super().reorder_cache(beam_idx)  # grouped layers reorder their stores
        for d in (self._pad_stored, self._pad_attn, self._lw_stored, self._lw_attn):
            for k_, v_ in d.items():
                if v_ is not None:
                    d[k_] = v_.index_select(0, beam_idx.to(v_.device))
        for f in self._fresh.values():
            f.attended = True
        for st in self.policy_state.values():
            for k_, v_ in st.items():
                if isinstance(v_, torch.Tensor):
                    st[k_] = v_.index_select(0, beam_idx.to(v_.device))
