"""Integrations: route tensors between other libraries and sparsattn (nothing is patched at import).

* ``sparsattn.integrations.hf``: Hugging Face transformers (``patch`` / ``unpatch`` / ``patched``,
  ``SparseCache``), through transformers' ``AttentionInterface``.
"""
