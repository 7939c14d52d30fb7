"""hf.modules: discovery of a transformers model's attention modules (from the modules, no model list)."""
from __future__ import annotations

import inspect
from typing import Optional

import torch


def _dispatches_through_interface(m) -> bool:
    fwd = getattr(type(m), "forward", None)
    if fwd is None:
        return False
    try:
        code = inspect.unwrap(fwd).__code__
    except (AttributeError, ValueError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _heads(m) -> tuple[Optional[int], Optional[int]]:
    cfg = getattr(m, "config", None)
    hq = getattr(cfg, "num_attention_heads", None) or getattr(m, "num_heads", None)
    hkv = getattr(cfg, "num_key_value_heads", None) or getattr(m, "num_key_value_heads", None)
    if hkv is None and hq is not None and getattr(m, "num_key_value_groups", None):
        hkv = hq // m.num_key_value_groups
    return hq, hkv


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """attention_modules: ``{layer_idx: module}`` of the decoder self-attention modules that dispatch
    through transformers' AttentionInterface; ValueError naming what is missing otherwise.

    Support is detected from the modules, not from a list of model families: a module must have
    ``config``, an int ``layer_idx``, ``scaling``, head counts (``config.num_attention_heads`` /
    ``num_key_value_heads``), look up ``ALL_ATTENTION_FUNCTIONS`` in its forward and be causal. Logit
    soft-capping (Gemma 2) and learned sinks (gpt-oss) are passed to the kernels at call time.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    found: dict[int, torch.nn.Module] = {}
    rejected: list[str] = []
    for name, m in model.named_modules():
        if not (hasattr(m, "layer_idx") and hasattr(m, "config")):
            continue
        if not _dispatches_through_interface(m):
            if any(hasattr(m, a) for a in ("q_proj", "c_attn", "qkv_proj", "query")):
                rejected.append(f"{name} ({type(m).__name__}): does not dispatch through transformers' "
                                "AttentionInterface (ALL_ATTENTION_FUNCTIONS)")
            continue
        missing = []
        if not isinstance(getattr(m, "layer_idx", None), int):
            missing.append("an int layer_idx")
        if not isinstance(getattr(m, "scaling", None), (int, float)):
            missing.append("a float `scaling` attribute")
        hq, hkv = _heads(m)
        if not hq:
            missing.append("config.num_attention_heads")
        if not hkv:
            missing.append("config.num_key_value_heads (or num_key_value_groups)")
        if getattr(m, "is_cross_attention", False):
            missing.append("self-attention (this is cross-attention)")
        if missing:
            rejected.append(f"{name} ({type(m).__name__}): missing {', '.join(missing)}")
            continue
        if m.layer_idx in found:
            rejected.append(f"{name} ({type(m).__name__}): duplicate layer_idx {m.layer_idx} "
                            "(several attention stacks are not supported)")
            continue
        found[m.layer_idx] = m
    if rejected:
        raise ValueError(f"model: unsupported attention module(s) for sparsattn ({type(model).__name__}): "
                         + "; ".join(rejected[:4]) + ("; ..." if len(rejected) > 4 else ""))
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no attention module that sparsattn can patch: "
                         "expected modules with config, layer_idx, scaling and head counts whose forward "
                         "dispatches through transformers' ALL_ATTENTION_FUNCTIONS")
    for idx, m in found.items():
        if getattr(m, "is_causal", True) is not True:
            raise ValueError(f"model: layer {idx} ({type(m).__name__}) is not causal (is_causal=False); "
                             "sparsattn.integrations.hf supports causal decoders")
    return dict(sorted(found.items()))


def _base_model(model, modules: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """The innermost module that contains every attention module and takes ``attention_mask``."""
    targets = {id(m) for m in modules.values()}
    best, best_n = model, None
    for m in model.modules():
        try:
            params = inspect.signature(m.forward).parameters
        except (TypeError, ValueError):
            continue
        if "attention_mask" not in params:
            continue
        ids = {id(x) for x in m.modules()}
        if targets <= ids and (best_n is None or len(ids) < best_n):
            best, best_n = m, len(ids)
    return best
