"""sparsattn: sparse attention for long-context transformers.

methods (one file per paper) -> patterns (BlockPattern / TokenPattern) -> kernels (one family).

Main entry points: ``attention``, ``attention_varlen``, ``patterns``, ``list_methods``,
``get_method``; Hugging Face integration in ``sparsattn.integrations.hf``.
"""
__version__ = "0.1.0"

from . import patterns  # noqa: E402
from .api import attention, attention_varlen, choose_backend  # noqa: E402
from .methods import get_method, list_methods  # noqa: E402
from .patterns import BlockPattern, TokenPattern  # noqa: E402

__all__ = ["attention", "attention_varlen", "choose_backend", "patterns", "BlockPattern", "TokenPattern", "patch", "unpatch", "patched",
           "get_method", "list_methods", "__version__"]


def __getattr__(name):
    """Lazy exports that import transformers only when used: ``patch``, ``unpatch``, ``patched``."""
    if name in ("patch", "unpatch", "patched"):
        from .integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'sparsattn' has no attribute {name!r}")
