"""CachePolicy: run a ``sparsattn.kv`` policy inside a transformers cache (``SparseCache``), on the one store.

``as_cache_policy(policy)`` wraps a ``KVPolicy`` (StreamingLLM, RazorAttention, MoA...) for
``sparsattn.integrations.hf.SparseCache``; ``SparseCache(policy=StreamingLLMPolicy(...))`` does the
wrapping itself. No transformers import here: the adapter only sees tensors, a
``sparsattn.kv.store.HeadGroupStore`` and the ``PolicyContext`` that SparseCache passes.

The policy always runs through ``KVPolicy.apply`` on a ``KVCache`` whose layer *is* a
``HeadGroupStore`` (``KVCache.adopt_store``: no copy), so what a policy promises on a ``KVCache`` is
kept here too:

* ``compress_store(layer_idx, store, ctx)``: the layer already lives in a store (SparseCache keeps a
  layer whose KV heads keep different lengths as one): the policy edits it in place; no padded copy
  is made, in either direction.
* ``compress_rows(layer_idx, keys, values, ctx)``: left-padded rows of a plain transformers layer
  (row (b, h) holds its ``ctx.head_lens[b, h]`` valid slots at the *end*, optional
  ``ctx.log_weight [B, Hkv, T]``): loaded slot-major into a new store (no copy when every row is full),
  policy applied, the store returned (SparseCache keeps it as the layer when the heads now differ).
* ``compress(layer_idx, keys, values, ctx)``: the generic interface (tensors in, left-padded tensors out;
  sets ``ctx.head_lens`` / ``ctx.log_weight`` / ``ctx.report``).

Positions: per-slot original positions live in the store; between runs on a plain layer they are kept
left-padded in ``ctx.cache.policy_state[layer]["pos"]`` (-1 for padding and merged slots), with
``seen [B]`` (real tokens appended; padding never counts, so sinks are the first *real* tokens of each
sequence) and ``steps``. Sliding-window layers (``ctx.extras["sliding"]``) are left to their own
window. ``every``: run the policy after the prefill and then every ``every`` decode steps (1 = every
step, the exact policy; larger values trade a cache up to ``every - 1`` tokens over budget for fewer
rewrites).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..patterns._util import _err  # the library's one error-message helper
from .cache import KVCache
from .policies import KVPolicy, ZipVLPolicy
from .store import HeadGroupStore, left_to_slots, slots_to_left

Tensor = torch.Tensor


class CachePolicy:
    """CachePolicy: a ``KVPolicy`` behind SparseCache's ``compress(layer_idx, keys, values, ctx)``.

    Args:
        policy: a ``sparsattn.kv.KVPolicy`` (not ZipVL: see ``as_cache_policy``).
        every: apply after the prefill and then every ``every`` decode steps (default 1).
        signals: optional ``fn(layer_idx, keys, values, ctx) -> dict`` of extra keyword arguments
            for ``policy.apply`` (for policies that take signals).
    """

    def __init__(self, policy: KVPolicy, *, every: int = 1, signals: Optional[Callable] = None):
        if not isinstance(policy, KVPolicy):
            raise _err("policy", "a sparsattn.kv.KVPolicy", type(policy).__name__)
        if isinstance(policy, ZipVLPolicy):
            raise ValueError("policy: ZipVLPolicy replaces the K/V by a mixed-precision store that a transformers "
                             "DynamicCache cannot hold (and needs the prefill queries); use it on a sparsattn.kv.KVCache")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise _err("every", "an int >= 1", every)
        if signals is not None and not callable(signals):
            raise _err("signals", "None or a callable", type(signals).__name__)
        self.policy, self.every, self.signals = policy, every, signals

    def __repr__(self) -> str:
        return f"CachePolicy({self.policy!r}, every={self.every})"

    def _run(self, layer_idx: int, store: HeadGroupStore, seen: Tensor, ctx, keys=None, values=None):
        """``policy.apply`` on a KVCache whose layer is ``store`` (in place); returns the store it leaves."""
        waste = float(getattr(ctx.cache, "group_waste", 0.1))
        kvc = KVCache(layer_idx + 1, store.batch, store.kv_heads, store.head_dim, dtype=store.dtype,
                      device=store.device, group_waste=waste)
        kvc.adopt_store(layer_idx, store, seen)
        extra = {}
        if self.signals is not None:
            if keys is None:
                keys, values = store.padded("k", left=True), store.padded("v", left=True)
            extra = self.signals(layer_idx, keys, values, ctx)
        rep = self.policy.apply(kvc, layer_idx, **extra)
        store = kvc.store(layer_idx)
        store.regroup(waste)  # capacity = the longest row of each group (memory = slots kept)
        ctx.report = dict(rep, layer=layer_idx, tokens_seen=seen.tolist())
        ctx.head_lens = store.lengths
        return store

    def _due(self, st: dict, ctx) -> bool:
        return not (ctx.phase == "decode" and st["steps"] % self.every)

    def compress_store(self, layer_idx: int, store: HeadGroupStore, ctx) -> Optional[HeadGroupStore]:
        """After ``ctx.n_new`` tokens were appended to ``store`` (at positions ``policy_state[layer]["seen"]``
        on): count them and, when due, run the policy on the store in place. Returns the store (None when
        the policy did not run)."""
        if ctx.extras.get("sliding"):
            return None
        st = ctx.cache.policy_state.setdefault(layer_idx, {})
        if "seen" not in st:
            raise ValueError(f"layer {layer_idx}: no policy state for a store-backed layer (seen positions)")
        st.pop("pos", None)  # positions live in the store
        st["seen"] = st["seen"] + ctx.n_new
        st["steps"] = st.get("steps", 0) + (ctx.phase == "decode")
        if not self._due(st, ctx):
            return None
        return self._run(layer_idx, store, st["seen"], ctx)

    def compress_rows(self, layer_idx: int, keys: Tensor, values: Tensor, ctx) -> Optional[HeadGroupStore]:
        """Left-padded rows (see the module docstring): track positions and, when due, load them slot-major
        into a new store (no copy when every row is full) and run the policy there. Returns the store
        (None when the policy did not run)."""
        if ctx.extras.get("sliding"):
            return None
        B, H, T, D = keys.shape
        dev = keys.device
        n = torch.as_tensor(ctx.head_lens, device=dev).long()
        if tuple(n.shape) != (B, H):
            raise _err("ctx.head_lens", f"[{B}, {H}]", tuple(n.shape))
        st = ctx.cache.policy_state.setdefault(layer_idx, {})
        t = torch.arange(T, device=dev)
        if "pos" not in st:
            first = T - n  # valid slots are the last n: positions 0..n-1 (padding never counts)
            pos = torch.where(t >= first[..., None], t - first[..., None], torch.full_like(t, -1).expand(B, H, T))
            seen = n.amax(1)
            steps = 0
        else:
            pos, seen, steps = st["pos"], st["seen"], st["steps"]
            if pos.shape[-1] + ctx.n_new != T or pos.shape[:2] != (B, H):
                raise _err("keys", f"[{B}, {H}, {pos.shape[-1] + ctx.n_new}, D] (the slots this policy left plus "
                           f"{ctx.n_new} new; was the cache changed outside the policy?)", tuple(keys.shape))
            new = (seen[:, None] + torch.arange(ctx.n_new, device=dev))[:, None, :].expand(B, H, ctx.n_new)
            pos = torch.cat([pos, new], -1)
            seen = seen + ctx.n_new
            steps += ctx.phase == "decode"
        st.update(pos=pos, seen=seen, steps=steps)
        if not self._due(st, ctx):
            return None
        lw = ctx.log_weight
        if bool((n == T).all()):  # every row full: slot-major already (the policy's writes make new tensors)
            rows = (keys, values, pos, lw)
        else:
            rows = (left_to_slots(keys, n), left_to_slots(values, n), left_to_slots(pos, n, -1),
                    None if lw is None else left_to_slots(lw, n))
        store = HeadGroupStore.from_rows(rows[0], rows[1], n, rows[2], rows[3], adopt=True, exact=True)
        del st["pos"]  # positions live in the store now (``to_left`` puts them back for a plain layer)
        return self._run(layer_idx, store, seen, ctx, keys, values)

    @staticmethod
    def to_left(layer_idx: int, store: HeadGroupStore, ctx):
        """A store's rows back as left-padded ``(keys, values, log_weight)`` of ``T`` = the longest row
        (views when every row is full), the positions into ``policy_state[layer]["pos"]``."""
        T = int(store.lengths.max()) if store.lengths.numel() else 0
        ctx.cache.policy_state.setdefault(layer_idx, {})["pos"] = store.padded("positions", left=True, slots=T)
        return tuple(store.padded(n, left=True, slots=T) for n in ("k", "v", "log_weight"))

    def compress(self, layer_idx: int, keys: Tensor, values: Tensor, ctx):
        """The generic ``compress`` interface: left-padded rows in, left-padded rows out (``ctx.head_lens``,
        ``ctx.log_weight`` and ``ctx.report`` set for them)."""
        store = self.compress_rows(layer_idx, keys, values, ctx)
        if store is None:
            return keys, values
        k, v, ctx.log_weight = self.to_left(layer_idx, store, ctx)
        return k, v


def as_cache_policy(policy, *, every: int = 1, signals: Optional[Callable] = None):
    """as_cache_policy: a ``KVPolicy`` (or an object with ``compress``, returned unchanged) for SparseCache.

    ``SparseCache(config=..., policy=as_cache_policy(StreamingLLMPolicy(n_sink=4, window=1024)))``;
    ``SparseCache(policy=StreamingLLMPolicy(...))`` wraps with the defaults. ZipVL is refused
    (ValueError): its quantised store does not fit a DynamicCache.
    """
    if isinstance(policy, CachePolicy):
        return policy
    if isinstance(policy, KVPolicy):
        return CachePolicy(policy, every=every, signals=signals)
    if callable(getattr(policy, "compress", None)):
        return policy
    raise _err("policy", "a sparsattn.kv.KVPolicy or an object with compress(layer_idx, keys, values, ctx)",
               type(policy).__name__)


__all__ = ["CachePolicy", "as_cache_policy", "left_to_slots", "slots_to_left"]  # the row helpers live in store
