"""KV cache and cache policies: storage, eviction/compression, quantisation and host offload.

``HeadGroupStore`` (the one K/V storage of a layer by KV head group, used by ``KVCache`` and by
``sparsattn.integrations.hf.SparseCache``), ``KVCache`` (contiguous or paged, per-(batch, head)
lengths, offload + prefetch), and policies
``StreamingLLMPolicy``, ``RazorAttentionPolicy``, ``MoAPolicy``, ``ZipVLPolicy``; ``as_cache_policy`` runs
a policy inside a transformers cache (``sparsattn.integrations.hf.SparseCache``).
"""
from .adapter import CachePolicy, as_cache_policy
from .cache import KVCache, Prefetched
from .policies import (KVPolicy, MixedPrecisionKV, MoAPolicy, RazorAttentionPolicy, StreamingLLMPolicy,
                       ZipVLPolicy, list_policies, policy_class, probe_importance, register_policy)
from .quant import QuantizedRows, quantize_rows
from .store import HeadGroup, HeadGroupStore

__all__ = ["KVCache", "Prefetched", "KVPolicy", "StreamingLLMPolicy", "RazorAttentionPolicy", "MoAPolicy",
           "ZipVLPolicy", "MixedPrecisionKV", "probe_importance", "register_policy", "list_policies", "policy_class", "QuantizedRows", "quantize_rows",
           "CachePolicy", "as_cache_policy", "HeadGroupStore", "HeadGroup"]
