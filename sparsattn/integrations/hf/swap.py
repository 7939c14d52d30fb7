"""hf.swap: point a transformers model's attention modules at another attention implementation.

transformers 5.x attention modules look up ``ALL_ATTENTION_FUNCTIONS.get_interface(
config._attn_implementation, ...)`` at every forward, and the mask helpers look up the mask function
by the same name. Swapping = registering an attention function (and a mask function) under a name
with ``AttentionInterface`` / ``AttentionMaskInterface`` and setting ``_attn_implementation`` on the
config objects the attention modules hold, remembering the previous values to restore them exactly.

The one home of that mechanism: ``patch`` (persistent, restored by ``unpatch``), ``capture_qkv``,
MoA's profiling (``sparsattn.calibrate.moa``) and the analysis attention edits use it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch

__all__ = ["register_implementation", "config_implementations", "set_implementation", "attention_swapped"]


def register_implementation(name: str, attention_fn: Callable, mask_fn: Optional[Callable] = None) -> None:
    """register_implementation: register ``attention_fn`` (and ``mask_fn``; default transformers'
    ``sdpa_mask``, the mask SDPA uses) under ``name`` with transformers' global interfaces."""
    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - older layouts
        from transformers.modeling_utils import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, sdpa_mask if mask_fn is None else mask_fn)


def config_implementations(modules: Iterable[torch.nn.Module]) -> tuple[list, list]:
    """config_implementations: ``(configs, saved)``: the distinct config objects held by ``modules``
    (in order of first appearance) and the attention implementation each one has now."""
    configs, saved = [], []
    for m in modules:
        c = m.config
        if all(c is not x for x in configs):
            configs.append(c)
            saved.append(c.__dict__.get("_attn_implementation_internal", getattr(c, "_attn_implementation", None)))
    return configs, saved


def set_implementation(config, value: Optional[str]) -> None:
    """set_implementation: set ``config``'s attention implementation to ``value`` without the checks
    transformers' setter runs (``value`` may be a name registered by ``register_implementation``)."""
    if "_attn_implementation_internal" in config.__dict__ or hasattr(type(config), "_attn_implementation"):
        config.__dict__["_attn_implementation_internal"] = value
    else:  # pragma: no cover - very old configs
        config._attn_implementation = value


@contextlib.contextmanager
def attention_swapped(model, name: str, attention_fn: Callable, mask_fn: Optional[Callable] = None, *,
                      modules: Optional[dict] = None):
    """attention_swapped: context manager running ``model``'s attention through ``attention_fn``.

    Args:
        model: a transformers model whose attention modules dispatch through ``AttentionInterface``.
        name: the implementation name to register (e.g. ``"sparsattn_capture"``).
        attention_fn: HF attention function ``(module, q, k, v, attention_mask, **kw) -> (out, weights)``.
        mask_fn: mask function registered under the same name (default: transformers' ``sdpa_mask``).
        modules: ``{layer: module}`` (default: ``attention_modules(model)``).
    Yields ``modules``; the previous implementations are restored on exit, also on error.
    """
    if modules is None:
        from .modules import attention_modules

        modules = attention_modules(model)
    register_implementation(name, attention_fn, mask_fn)
    configs, saved = config_implementations(modules.values())
    try:
        for c in configs:
            set_implementation(c, name)
        yield modules
    finally:
        for c, s in zip(configs, saved):
            set_implementation(c, s)
