"""hf: Hugging Face transformers integration through transformers' ``AttentionInterface``.

Nothing happens at import. ``patch(model, method=...)``:

1. registers (once, lazily) an attention function and a mask function under the name
   ``"sparsattn"`` with ``transformers.AttentionInterface`` / ``AttentionMaskInterface`` (the same
   global tables ``ALL_ATTENTION_FUNCTIONS`` / ``ALL_MASK_ATTENTION_FUNCTIONS`` that hold "sdpa",
   "flash_attention_2"...);
2. sets ``_attn_implementation`` to ``"sparsattn"`` on the config objects held by the model's
   attention modules (transformers 5.x attention modules look up
   ``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)`` at every
   forward, and the mask helpers look up the mask function by the same name), remembering the
   previous value so that ``unpatch`` restores it exactly;
3. attaches a small per-layer binding (the chosen methods) to each attention module, and a
   forward pre-hook on the base model that opens a per-forward frame (cross-layer ``state``,
   the cache, the context-length warning).

The registered mask function does not materialise an O(T^2) mask: for the plain causal and the
sliding-window causal masks it returns a ``MaskInfo`` (kind, window and the original 2-D padding
mask); for anything else (packed sequences, block overlays, bidirectional...) it returns the
boolean 4-D mask transformers' SDPA path would use, and the attention function then falls back
to dense SDPA for that call (logged at DEBUG): never silently wrong.

Prefill: a method that computes attention itself (``Method.attend``, e.g. HyperAttention) is called
with q/k/v and its output is the layer's (dense attention for padded batches, sliding-window layers
and models with logit soft-capping or sink logits);
otherwise ``method.select(q, k, SelectContext(...))`` on q/k after RoPE (as HF passes them), then
``sparsattn.attention`` with the pattern (intersected with the layer's sliding window, if any) and,
for padded batches, ``q_lens/kv_lens/padding_side``. Decode (one new token with a cache): a
decode-phase method's ``select(q, k_cache, ctx)`` returns a ``TokenPattern`` and
``sparsattn.kernels.sparse_decode.sparse_decode_attention`` computes it; prefill-phase methods run
dense at decode (as MInference does).

Hooks for methods, in ``SelectContext``'s typed fields: ``phase`` ("prefill"|"decode"), ``v`` (prefill: the
values ``[B, Hkv, Tk, D]``, aligned like k), ``q_lens``,
``kv_lens``, ``padding_side`` (q/k given to ``select`` at prefill are always right-aligned, i.e.
sequence b occupies rows ``[0, q_lens[b])``), ``position_ids`` (when the model passes them),
``sliding_window``, ``num_kv_groups``, and, for a method whose class sets
``needs_pre_rope = True``, ``q_pre_rope`` / ``k_pre_rope``: the outputs of the module's
``q_proj``/``k_proj`` for the current tokens, ``[B, H, T, D]`` (before any q/k norm and RoPE),
captured by forward hooks installed only for such methods.

Modules: ``patch`` (patch / unpatch / patched, method specs), ``forward`` (the attention function,
the per-layer binding), ``mask`` (the mask function), ``heads`` (per-head composition of patterns),
``padding`` (padded batches), ``modules`` (attention-module discovery), ``swap`` (the one
attention-implementation swap, also used by ``capture_qkv`` and calibration), ``cache`` /
``cache_groups`` (``SparseCache``), ``static`` (static caches and the compiled decode step),
``auto`` (``from_pretrained(..., attn_implementation="sparsattn")`` with the methods read from the
model's config), ``report`` (``PatchReport``: what ran, per layer and head; ``patched`` yields it).

Gemma 2's logit soft-capping (``softcap``) and gpt-oss's learned sink logits (``s_aux``) reach every
path: the sparse kernels, the dense fallbacks, static caches and ``SparseCache.attend`` (the rows a
KV policy left).
"""
from __future__ import annotations

from typing import Optional

from .cache import GroupedKV, GroupedLayer, PolicyContext, SparseCache
from .forward import NAME, sparse_attention_forward
from .mask import MaskInfo, sparse_attention_mask
from .modules import attention_modules
from .patch import MethodSpec, is_patched, patch, patched, unpatch
from .report import PatchReport, report_of
from .swap import attention_swapped, config_implementations, register_implementation, set_implementation

#: Backend used by patched layers whose ``patch(..., backend=None)``: None = ``sparsattn.attention``'s
#: automatic choice. Tests on the CPU set "reference" to avoid the (slow) Triton interpreter. Read at
#: every call (``forward.default_backend``), so assigning it here takes effect.
DEFAULT_BACKEND: Optional[str] = None

__all__ = ["patch", "unpatch", "patched", "is_patched", "SparseCache", "MaskInfo", "attention_modules", "NAME",
           "attention_swapped", "DEFAULT_BACKEND", "PatchReport", "report_of"]
