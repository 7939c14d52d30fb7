"""hf.cache_groups: a SparseCache layer stored as head groups (see ``sparsattn.integrations.hf.cache``).

``HeadGroup`` (KV heads of one layer stored together, rows left-padded), ``GroupedKV`` (the data-less
placeholders ``update`` returns for such a layer), ``GroupedLayer`` (the transformers cache layer)
and ``_attend_rows`` (causal attention on left-padded rows with per-row padding and log-weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from ...kv.groups import materialise
from ...patterns import TokenPattern


@dataclass
class HeadGroup:
    """HeadGroup: KV heads of one layer stored together (rows left-padded to the group's capacity).

    Attributes:
        heads: int64 ``[H_g]`` KV head ids (ascending).
        keys, values: ``[B, H_g, cap, D]``; row (b, j) holds its valid slots at the end.
        pad: int64 ``[B, H_g]`` padding slots in front of each row.
        log_weight: None or float32 ``[B, H_g, cap]`` per-slot log-weights.
    """

    heads: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    pad: torch.Tensor
    log_weight: Optional[torch.Tensor] = None

    @property
    def cap(self) -> int:
        return self.keys.shape[2]

    def map(self, fn) -> "HeadGroup":
        """The group with ``fn`` applied to its per-batch tensors (keys, values, pad, log_weight)."""
        return HeadGroup(self.heads, fn(self.keys), fn(self.values), fn(self.pad),
                         None if self.log_weight is None else fn(self.log_weight))


_GKV_ALLOWED = frozenset({torch.Tensor.shape.__get__, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndim.__get__,
                          torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.numel,
                          torch.Tensor.is_cuda.__get__})


class GroupedKV(torch.Tensor):
    """GroupedKV: what ``SparseCache.update`` returns for a layer stored as head groups.

    A data-less tensor with the shape ``[B, Hkv, T, D]`` (T = the largest group's slots after the
    append), dtype and device of the padded layout. Shape, dtype and device can be read; any other
    use raises ValueError: attention on such a layer goes through ``SparseCache.attend`` (the
    attention of ``sparsattn.integrations.hf.patch`` does), never through these tensors.
    """

    @staticmethod
    def __new__(cls, shape, dtype, device, layer_idx: int, name: str):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        t._layer_idx, t._name = layer_idx, name
        return t

    def __repr__(self, *args, **kwargs):
        return f"GroupedKV({self._name} of layer {self._layer_idx}, shape={tuple(self.shape)}, no data)"

    @classmethod
    def _refuse(cls, func, args):
        me = next((a for a in args if isinstance(a, GroupedKV)), None)
        what = f"the {me._name} of layer {me._layer_idx}" if me is not None else "a SparseCache layer"
        raise ValueError(f"{what} are stored as head groups of different lengths (SparseCache group_waste) and "
                         f"cannot be used as one tensor ({getattr(func, '__name__', func)}); attend through "
                         "SparseCache.attend (sparsattn.integrations.hf.patch does), read SparseCache.layers[i].keys "
                         "for a materialised padded copy, or use group_waste=1")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _GKV_ALLOWED:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        cls._refuse(func, args)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        cls._refuse(func, args)


def _materialise(groups: list, H: int, name: str, fill=0):
    """Padded ``[B, H, T, ...]`` tensor (T = the largest capacity) of the groups' ``name`` field, rows
    left-padded with ``fill``; None when no group has the field."""
    ref = next((getattr(g, name) for g in groups if getattr(g, name) is not None), None)
    if ref is None:
        return None
    return materialise([(g.heads, getattr(g, name)) for g in groups], ref.shape[0], H, max(g.cap for g in groups),
                       fill, left=True)


class GroupedLayer(DynamicLayer):
    """GroupedLayer: a SparseCache layer stored as head groups (see the module docstring).

    ``groups``: the ``HeadGroup`` list (stored state); ``base``: the layer it replaces (its class
    decides sliding-window behaviour and holds ``cumulative_length``; its own keys/values are None
    while grouped). ``keys`` / ``values`` are materialised padded copies (read-only).
    """

    def __init__(self, base, groups: list, n_heads: int, layer_idx: int):
        # no DynamicLayer.__init__: keys / values are properties here
        self.base, self.groups, self.n_heads, self.layer_idx = base, groups, n_heads, layer_idx
        self.is_initialized = True
        self.device = getattr(base, "device", groups[0].keys.device)
        self.is_sliding = bool(getattr(base, "is_sliding", False))
        self.fresh: Optional[list] = None  # the groups right after the last append (what attention reads)
        base.keys = base.values = None

    def _refuse(self, what: str):
        raise ValueError(f"SparseCache layer {self.layer_idx} is stored as head groups (per-head lengths after a KV "
                         f"policy): {what} is not supported on it (use group_waste=1 for the single padded tensor)")

    @property
    def keys(self) -> torch.Tensor:
        """Materialised padded keys ``[B, Hkv, T, D]`` (a new tensor; T = the largest group capacity)."""
        return _materialise(self.groups, self.n_heads, "keys")

    @keys.setter
    def keys(self, value):
        self._refuse("assigning keys")

    @property
    def values(self) -> torch.Tensor:
        """Materialised padded values ``[B, Hkv, T, D]`` (a new tensor)."""
        return _materialise(self.groups, self.n_heads, "values")

    @values.setter
    def values(self, value):
        self._refuse("assigning values")

    def slots(self) -> int:
        """Slots of the padded view (the largest group capacity)."""
        return max(g.cap for g in self.groups)

    def update(self, key_states, value_states, *args, **kwargs):
        """Append ``[B, Hkv, n, D]`` to every group; returns ``GroupedKV`` placeholders."""
        n = key_states.shape[-2]
        dev = key_states.device
        fresh = []
        for g in self.groups:
            hs = g.heads.to(dev)
            lw = None if g.log_weight is None else torch.cat(
                [g.log_weight, g.log_weight.new_zeros(*g.log_weight.shape[:2], n)], -1)
            fresh.append(HeadGroup(g.heads, torch.cat([g.keys, key_states[:, hs]], -2),
                                   torch.cat([g.values, value_states[:, hs]], -2), g.pad, lw))
        stored = fresh
        if self.is_sliding:
            if getattr(self.base, "record_past", False):
                self._refuse("past recording (activate_past_recording)")
            self.base.cumulative_length += n
            w = self.base.sliding_window - 1  # DynamicSlidingWindowLayer keeps the last window - 1 slots
            stored = []
            for g in fresh:
                drop = max(g.cap - w, 0)
                if drop:
                    g = HeadGroup(g.heads, g.keys[:, :, drop:], g.values[:, :, drop:], (g.pad - drop).clamp(min=0),
                                  None if g.log_weight is None else g.log_weight[..., drop:])
                stored.append(g)
        self.groups, self.fresh = stored, fresh
        B, T, D = key_states.shape[0], max(g.cap for g in fresh), key_states.shape[-1]
        return (GroupedKV((B, self.n_heads, T, D), key_states.dtype, dev, self.layer_idx, "keys"),
                GroupedKV((B, self.n_heads, T, D), value_states.dtype, dev, self.layer_idx, "values"))

    def get_seq_length(self) -> int:
        if self.is_sliding:
            return self.base.cumulative_length
        return self.slots()

    def get_mask_sizes(self, query_length):
        if self.is_sliding:
            return self.base.get_mask_sizes(query_length)
        # transformers < 5.2x passes cache_position (a tensor of the new positions) instead of the count
        n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.slots() + n, 0

    def get_max_length(self) -> int:
        return self.base.get_max_length()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.groups = [g.map(lambda t: t.index_select(0, beam_idx.to(t.device))) for g in self.groups]
        self.fresh = None

    def offload(self):
        self.groups = [g.map(lambda t: t.to("cpu", non_blocking=True)) for g in self.groups]

    def prefetch(self):
        self.groups = [g.map(lambda t: t.to(self.device, non_blocking=True)) for g in self.groups]

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse("crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("batch_select_indices")

    def reset(self) -> None:
        self._refuse("reset")


def _attend_rows(q, k, v, pad, lw, scale, backend, dense_dtype) -> torch.Tensor:
    """Causal attention of ``q [B, Hq, Tq, D]`` (the last Tq slots) on left-padded rows ``k, v [B, H, T, D]``
    with ``pad [B, H]`` padding slots in front and optional log-weights ``lw [B, H, T]``."""
    B, Hq, Tq, D = q.shape
    H, T = k.shape[1], k.shape[2]
    dev = k.device
    if Tq == 1:
        from ...kernels.sparse_decode import sparse_decode_attention

        idx = (pad[..., None] + torch.arange(T, device=dev)).clamp(max=T - 1)
        tp = TokenPattern(idx.to(torch.int32).contiguous(), (T - pad).to(torch.int32).contiguous(), T)
        lws = None if lw is None else torch.gather(lw.to(dev), 2, idx)
        be = backend if backend in ("triton", "reference") else None
        return sparse_decode_attention(q[:, :, 0], k, v, tp, scale=scale, log_weight=lws, backend=be)[:, :, None]
    j = torch.arange(T, device=dev)
    i = torch.arange(Tq, device=dev)[:, None] + (T - Tq)
    keep = (j[None, None, None, :] >= pad[:, :, None, None]) & (j <= i)[None, None]  # [B, H, Tq, T]
    w = torch.zeros((), device=dev) if lw is None else lw.to(dev).float()[:, :, None, :]
    bias = torch.where(keep, w, torch.full((), float("-inf"), device=dev))
    g = Hq // H
    dt = dense_dtype  # log-weights (log n) need more than 16-bit precision
    bias = bias.repeat_interleave(g, 1).to(dt)
    kk, vv = (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)) if g > 1 else (k, v)
    out = F.scaled_dot_product_attention(q.to(dt), kk.to(dt), vv.to(dt), attn_mask=bias, scale=scale)
    return out.to(q.dtype)
