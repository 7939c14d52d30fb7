"""hf.cache_groups: a SparseCache layer stored as head groups (see ``sparsattn.integrations.hf.cache``).

The storage is ``sparsattn.kv.store.HeadGroupStore``, the one head-group store (``sparsattn.kv.KVCache``
keeps its contiguous layers in it too). ``GroupedLayer`` is the transformers cache layer around a store;
``GroupedKV`` the data-less placeholders ``update`` returns for it; ``HeadGroup`` is the store's group.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer

from ...kv.store import HeadGroup, HeadGroupStore

__all__ = ["GroupedKV", "GroupedLayer", "HeadGroup"]


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


class GroupedLayer(DynamicLayer):
    """GroupedLayer: a SparseCache layer stored as head groups in a ``HeadGroupStore`` (slot-major rows).

    ``store``: the storage; ``base``: the layer it replaces (its class decides sliding-window behaviour
    and holds ``cumulative_length``; its own keys/values are None while grouped). ``keys`` / ``values``
    are materialised left-padded copies (read-only). Between an update and its attention they show the
    appended rows before the policy's run (the SparseCache runs it after the attention).
    """

    def __init__(self, base, store: HeadGroupStore, layer_idx: int):
        # no DynamicLayer.__init__: keys / values are properties here
        self.base, self.store, self.n_heads, self.layer_idx = base, store, store.kv_heads, layer_idx
        self.is_initialized = True
        self.device = getattr(base, "device", store.device)
        self.is_sliding = bool(getattr(base, "is_sliding", False))
        self.first: Optional[torch.Tensor] = None  # position of the next appended token per sequence
        base.keys = base.values = None

    def _refuse(self, what: str):
        raise ValueError(f"SparseCache layer {self.layer_idx} is stored as head groups (per-head lengths after a KV "
                         f"policy): {what} is not supported on it (use group_waste=1 for the single padded tensor)")

    @property
    def groups(self) -> list:
        """The store's ``HeadGroup`` list."""
        return self.store.groups

    @property
    def keys(self) -> torch.Tensor:
        """Materialised left-padded keys ``[B, Hkv, T, D]`` (a new tensor; T = the largest group capacity)."""
        return self.store.padded("k", left=True)

    @keys.setter
    def keys(self, value):
        self._refuse("assigning keys")

    @property
    def values(self) -> torch.Tensor:
        """Materialised left-padded values ``[B, Hkv, T, D]`` (a new tensor)."""
        return self.store.padded("v", left=True)

    @values.setter
    def values(self, value):
        self._refuse("assigning values")

    def slots(self) -> int:
        """Slots of the padded view (the largest group capacity)."""
        return self.store.slots()

    def update(self, key_states, value_states, *args, **kwargs):
        """Append ``[B, Hkv, n, D]`` to every row of the store (positions from ``self.first [B]``, set by the
        SparseCache before the call; None: unknown); returns ``GroupedKV`` placeholders (the sliding window is
        applied when the layer settles)."""
        st, first = self.store, self.first
        n = key_states.shape[-2]
        if self.is_sliding:
            if getattr(self.base, "record_past", False):
                self._refuse("past recording (activate_past_recording)")
            self.base.cumulative_length += n
        lens = torch.full((st.batch,), n, dtype=torch.long, device=st.device)
        st.append(key_states.to(device=st.device, dtype=st.dtype), value_states.to(device=st.device, dtype=st.dtype),
                  lens, None if first is None else first.to(st.device))
        B, T, D = key_states.shape[0], st.slots(), key_states.shape[-1]
        dev = key_states.device
        return (GroupedKV((B, self.n_heads, T, D), key_states.dtype, dev, self.layer_idx, "keys"),
                GroupedKV((B, self.n_heads, T, D), value_states.dtype, dev, self.layer_idx, "values"))

    def trim_window(self, waste: float) -> None:
        """Sliding-window layer: keep the last ``sliding_window - 1`` slots of every row (as
        ``DynamicSlidingWindowLayer``), capacity fitted."""
        w = self.base.sliding_window - 1
        st = self.store
        if int(st.lengths.max()) <= w:
            return
        j = torch.arange(st.slots(), device=st.device)
        st.evict(j >= (st.lengths - w)[..., None])
        st.regroup(waste)

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
        self.store.map(lambda t: t.index_select(0, beam_idx.to(t.device)))
        self.store.lengths = self.store.lengths.index_select(0, beam_idx.to(self.store.lengths.device))

    def offload(self):
        self.store.map(lambda t: t.to("cpu", non_blocking=True), ("k", "v"))

    def prefetch(self):
        self.store.map(lambda t: t.to(self.device, non_blocking=True), ("k", "v"))

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse("crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("batch_select_indices")

    def reset(self) -> None:
        self._refuse("reset")
