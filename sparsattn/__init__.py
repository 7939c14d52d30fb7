"""sparsattn: sparse attention for long-context transformers.

methods (one file per paper) -> patterns (BlockPattern / TokenPattern) -> kernels (one family).
"""
__version__ = "0.1.0"
