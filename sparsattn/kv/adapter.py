"""CachePolicy: run a ``sparsattn.kv`` policy on left-padded cache rows (a transformers ``DynamicCache``).

``as_cache_policy(policy)`` wraps a ``KVPolicy`` (StreamingLLM, RazorAttention, MoA...) in the
``compress(layer_idx, keys, values, ctx)`` interface of
``sparsattn.integrations.hf.SparseCache``; ``SparseCache(policy=StreamingLLMPolicy(...))``
does the wrapping itself. No transformers import here: the adapter only sees tensors and the
``PolicyContext`` that SparseCache passes.

Row layout (SparseCache's): ``keys [B, Hkv, T, D]``, row (b, h) holds its ``ctx.head_lens[b, h]``
valid slots at the *end* (left padding in front, per sequence at the prompt and per head once a
policy drops different tokens per head), with optional per-slot log-weights ``ctx.log_weight
[B, Hkv, T]`` (a merged slot standing for n tokens has ``log n``). Each call:

1. extends the per-slot original positions (kept in ``ctx.cache.policy_state[layer]``: ``pos
   [B, Hkv, T]``, -1 for padding and merged slots, and ``seen [B]``, the real tokens appended;
   padding never counts as a token, so sinks are the first *real* tokens of each sequence);
2. loads the rows slot-major into a one-layer ``KVCache`` (``KVCache.load_layer``), runs
   ``policy.apply`` there (the same code as on a ``KVCache``, so what a policy promises is kept
   here too), and writes the result back left-padded to the longest kept row;
3. sets ``ctx.head_lens`` / ``ctx.log_weight`` to the new layout and ``ctx.report`` to the
   policy's report (bytes before/after, slots before/after).

Sliding-window layers (``ctx.extras["sliding"]``) are left to their own window. ``every``: run the
policy after the prefill and then every ``every`` decode steps (1 = every step, the exact
policy; larger values trade a cache up to ``every - 1`` tokens over budget for fewer rewrites).
Cost of one run: a few copies of the layer's kept rows (alignment, the policy's compaction); for
caches that stay large (RazorAttention's retrieval heads) ``every > 1`` amortises it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .cache import KVCache
from .policies import KVPolicy, ZipVLPolicy

Tensor = torch.Tensor


def _err(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def left_to_slots(x: Tensor, n: Tensor, fill=0) -> Tensor:
    """Rows ``x [B, H, T, ...]`` whose valid entries are the last ``n[b, h]`` -> slot-major (valid
    entries first, in order; ``fill`` after)."""
    B, H, T = x.shape[:3]
    src = torch.arange(T, device=x.device) + (T - n.long())[..., None]  # [B, H, T]
    ok = src < T
    src = src.clamp(max=max(T - 1, 0))
    g = src.view(B, H, T, *([1] * (x.dim() - 3))).expand(x.shape)
    out = torch.gather(x, 2, g)
    return out.masked_fill(~ok.view(B, H, T, *([1] * (x.dim() - 3))), fill)


def slots_to_left(x: Tensor, n: Tensor, T_out: int, fill=0) -> Tensor:
    """Slot-major rows ``x [B, H, T, ...]`` (``n[b, h]`` valid first) -> ``[B, H, T_out, ...]`` with the
    valid entries at the end (left padding with ``fill``)."""
    B, H = x.shape[:2]
    src = torch.arange(T_out, device=x.device) - (T_out - n.long())[..., None]  # [B, H, T_out]
    ok = src >= 0
    src = src.clamp(min=0, max=max(x.shape[2] - 1, 0))
    tail = x.shape[3:]
    g = src.view(B, H, T_out, *([1] * len(tail))).expand(B, H, T_out, *tail)
    if x.shape[2] == 0:
        return x.new_full((B, H, T_out, *tail), fill)
    out = torch.gather(x, 2, g)
    return out.masked_fill(~ok.view(B, H, T_out, *([1] * len(tail))), fill)


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

    def compress(self, layer_idx: int, keys: Tensor, values: Tensor, ctx):
        if ctx.extras.get("sliding"):
            return keys, values
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
        if ctx.phase == "decode" and steps % self.every:
            return keys, values
        kvc = KVCache(layer_idx + 1, B, H, D, dtype=keys.dtype, device=dev)
        lw = ctx.log_weight
        kvc.load_layer(layer_idx, left_to_slots(keys, n), left_to_slots(values, n), n, left_to_slots(pos, n, -1),
                       seen, None if lw is None else left_to_slots(lw, n), adopt=True)
        extra = self.signals(layer_idx, keys, values, ctx) if self.signals is not None else {}
        rep = self.policy.apply(kvc, layer_idx, **extra)
        k2, v2 = kvc.get(layer_idx)
        n2 = kvc.lengths(layer_idx)
        lw2 = kvc.log_weights(layer_idx)
        T2 = int(n2.max()) if n2.numel() else 0
        st["pos"] = slots_to_left(kvc.positions(layer_idx), n2, T2, -1)
        ctx.head_lens = n2
        ctx.log_weight = None if lw2 is None else slots_to_left(lw2, n2, T2, 0.0)
        ctx.report = dict(rep, layer=layer_idx, tokens_seen=seen.tolist())
        return slots_to_left(k2, n2, T2), slots_to_left(v2, n2, T2)


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


__all__ = ["CachePolicy", "as_cache_policy", "left_to_slots", "slots_to_left"]
