"""hf_cache: the former home of ``SparseCache`` (now ``sparsattn.integrations.hf.cache``); this import
path keeps working for code written against it."""
from .hf.cache import GroupedKV, GroupedLayer, HeadGroup, PolicyContext, SparseCache

__all__ = ["SparseCache", "PolicyContext", "HeadGroup", "GroupedKV", "GroupedLayer"]
