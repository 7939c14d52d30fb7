"""hf.auto: load a saved model sparse with ``from_pretrained(path, attn_implementation="sparsattn")``.

The methods live in the model's config, under the key ``sparsattn`` (so in ``config.json``)::

    config.sparsattn = {"method": "vertical_slash", "config": {"vertical_size": 64}}

The entry holds ``patch``'s keyword arguments as JSON: ``method``, ``decode``, ``heads``, ``backend`` and
``config`` (the hyper-parameters ``patch`` spreads over the named methods). A method may be a
registered name, or ``{"name": NAME, "config": {...}}`` for one method with its own hyper-parameters;
``method`` / ``decode`` may map layers (``{"0": ..., "default": ...}``) and a layer's entry may map query
heads, exactly as ``patch`` takes them (JSON keys are strings: digits are read as indices). A calibrated
method's ``path`` is relative to the model's folder when it is not absolute.

* ``register()``: registers the attention and mask functions under ``"sparsattn"`` with transformers'
  ``AttentionInterface`` / ``AttentionMaskInterface`` (needed before ``from_pretrained`` checks the
  name; ``patch`` and ``save_pretrained`` call it too). Nothing is registered at import.
* A model loaded with ``attn_implementation="sparsattn"`` binds itself at its first forward: the
  attention function finds the model being run (the innermost-to-outermost callers on the stack)
  and calls ``bind(model)`` = ``patch(model, **entry)``. ``bind`` may also be called right after
  loading (needed before a compiled first forward, or when the first forward gets a ``SparseCache``).
* ``config_entry(model)`` turns a live patch into the entry (each layer's methods with every
  hyper-parameter; calibrated methods write their calibration next to the weights), and
  ``save_pretrained(model, path)`` stores it in the config and saves the model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ...methods.base import Method, get_method, method_class
from .forward import NAME
from .heads import _Choice

CONFIG_KEY = "sparsattn"
_KEYS = ("method", "decode", "heads", "backend", "config", "version")
_CALIB_DIR = "sparsattn_calibration"


def register() -> None:
    """register: register ``"sparsattn"`` with transformers' attention and mask interfaces (idempotent)."""
    from .patch import _register

    _register()


# ----------------------------------------------------------------------------------------------
# config entry -> patch arguments
# ----------------------------------------------------------------------------------------------


def _err(field: str, expected: str, got) -> ValueError:
    return ValueError(f"config.{CONFIG_KEY}{field}: expected {expected}, got {got!r}")


def _key(k, field: str):
    if k == "default":
        return k
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    if isinstance(k, str) and k.isdigit():
        return int(k)
    raise _err(field, "layer/head indices (digits) or 'default' as keys", k)


def _element(x, field: str, base: Optional[Path]):
    """A method element: a registered name, or {"name", "config"} -> a Method instance."""
    if isinstance(x, str):
        try:
            method_class(x)
        except ValueError as e:
            raise ValueError(f"config.{CONFIG_KEY}{field}: {e}") from None
        return x
    if isinstance(x, dict) and "name" in x:
        extra = sorted(set(x) - {"name", "config"})
        if extra or not isinstance(x["name"], str) or not isinstance(x.get("config", {}), dict):
            raise _err(field, '{"name": str, "config": {...}}', x)
        cfg = dict(x.get("config") or {})
        p = cfg.get("path")
        if isinstance(p, str) and base is not None and not os.path.isabs(p):
            cfg["path"] = str(base / p)
        try:
            return get_method(x["name"], **cfg)
        except ValueError as e:
            raise ValueError(f"config.{CONFIG_KEY}{field}: {e}") from None
    raise _err(field, 'a method name or {"name": str, "config": {...}}', x)


def _spec(x, field: str, base: Optional[Path], depth: int):
    """method/decode value: element | {layer: element-or-heads} (depth 0) | {head: element} (depth 1)."""
    if x is None:
        return None
    if isinstance(x, str) or (isinstance(x, dict) and "name" in x):
        return _element(x, field, base)
    if isinstance(x, dict) and depth < 2:
        return {_key(k, field): _spec(v, f"{field}[{k!r}]", base, depth + 1) for k, v in x.items()}
    raise _err(field, "a method name, {\"name\", \"config\"} or a mapping of layers / heads", x)


def patch_kwargs(entry: dict, base: Optional[Path] = None) -> dict:
    """patch_kwargs: ``patch``'s keyword arguments from a config entry (see the module docstring).

    Args:
        entry: the ``config.sparsattn`` dict.
        base: folder that relative calibration paths are read from (the model's folder).
    Raises ValueError naming ``config.sparsattn`` and the field for a malformed entry.
    """
    if not isinstance(entry, dict):
        raise _err("", 'a dict such as {"method": "vertical_slash", "config": {...}}', entry)
    bad = sorted(set(entry) - set(_KEYS))
    if bad:
        raise _err("", f"only the keys {list(_KEYS)}", bad)
    if entry.get("method") is None and entry.get("decode") is None:
        raise _err(".method", "a method (or a decode method in .decode)", entry.get("method"))
    cfg = entry.get("config") or {}
    if not isinstance(cfg, dict):
        raise _err(".config", "a dict of hyper-parameters", cfg)
    backend = entry.get("backend")
    if backend is not None and not isinstance(backend, str):
        raise _err(".backend", "a backend name or null", backend)
    heads = entry.get("heads")
    out: dict[str, Any] = dict(cfg)
    out["method"] = _spec(entry.get("method"), ".method", base, 0) if entry.get("method") is not None else "dense"
    if entry.get("decode") is not None:
        out["decode"] = _spec(entry["decode"], ".decode", base, 0)
    if heads is not None:
        if not isinstance(heads, dict):
            raise _err(".heads", "a mapping {query_head: method}", heads)
        out["heads"] = {_key(k, ".heads"): _element(v, f".heads[{k!r}]", base) for k, v in heads.items()}
    if backend is not None:
        out["backend"] = backend
    return out


def _model_dir(model) -> Optional[Path]:
    p = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(p) if p and os.path.isdir(p) else None


def config_of(model) -> Optional[dict]:
    """config_of: the ``sparsattn`` entry of ``model``'s config (or of its text config), None if absent."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "get_text_config", lambda: None)() if cfg is not None else None):
        entry = getattr(c, CONFIG_KEY, None) if c is not None else None
        if entry is not None:
            return entry
    return None


def bind(model):
    """bind: patch ``model`` with the methods of its config's ``sparsattn`` entry; returns ``model``.

    Raises ValueError when the config has no entry (then call ``patch(model, method=...)`` yourself).
    """
    from .patch import patch

    entry = config_of(model)
    if entry is None:
        raise ValueError(f"config.{CONFIG_KEY}: missing in {type(model).__name__}'s config, so the model loaded with "
                         f"attn_implementation='sparsattn' does not know its methods; save it with "
                         "sparsattn.integrations.hf.auto.save_pretrained, set config.sparsattn = {'method': ...}, or "
                         "call sparsattn.integrations.hf.patch(model, method=...)")
    from .patch import _PATCH_ATTR

    had = getattr(model, _PATCH_ATTR, None) is not None
    patch(model, **patch_kwargs(entry, _model_dir(model)))
    p = getattr(model, _PATCH_ATTR)
    if not had:  # loaded as "sparsattn": unpatch restores SDPA (not "sparsattn", which would bind again)
        p.saved = ["sdpa" if s == NAME else s for s in p.saved]
    return model


def _running_model(module: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The outermost module on the call stack that contains ``module`` (a transformers model preferred)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = torch.nn.Module
    best = best_any = None
    f = sys._getframe(1)
    seen: set = set()
    while f is not None:
        obj = f.f_locals.get("self")
        if isinstance(obj, torch.nn.Module) and obj is not module and id(obj) not in seen:
            seen.add(id(obj))
            if any(m is module for m in obj.modules()):
                best_any = obj
                if isinstance(obj, PreTrainedModel):
                    best = obj
        f = f.f_back
    return best if best is not None else best_any


def bind_running(module: torch.nn.Module):
    """bind_running: ``bind`` the model that is running ``module`` (called by the attention function
    for a module of a model loaded with ``attn_implementation="sparsattn"`` and not patched yet)."""
    from .cache import SparseCache

    if torch.compiler.is_compiling():
        raise RuntimeError("sparsattn: a model loaded with attn_implementation='sparsattn' must be bound before "
                           "torch.compile traces it: call sparsattn.integrations.hf.auto.bind(model) after loading")
    model = _running_model(module)
    if model is None:
        raise RuntimeError(f"sparsattn: {type(module).__name__} uses attn_implementation 'sparsattn' but was not "
                           "patched, and no model running it was found: call sparsattn.integrations.hf.patch(model, ...)")
    bind(model)
    f = sys._getframe(1)
    while f is not None:  # the forward already under way: give it its frame (the pre-hook ran before binding)
        loc = f.f_locals
        cache = loc.get("cache", loc.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_seq_length"):
            if isinstance(cache, SparseCache):
                raise ValueError("past_key_values: a SparseCache given to the first forward of a model loaded with "
                                 "attn_implementation='sparsattn'; call sparsattn.integrations.hf.auto.bind(model) first")
            from .patch import _PATCH_ATTR, _cache_state

            p = getattr(model, _PATCH_ATTR)
            # (the post-hook may not run for this forward: the next forward's pre-hook drops the frame)
            p.frames.append({"state": _cache_state(cache, fresh=False), "cache": cache, "inflight": True})
            break
        f = f.f_back
    return model


# ----------------------------------------------------------------------------------------------
# live patch -> config entry
# ----------------------------------------------------------------------------------------------


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _method_entry(m: Method, where: str, out_dir: Optional[Path], written: dict) -> dict:
    name = getattr(type(m), "name", "")
    if not name:
        raise ValueError(f"{where}: method {type(m).__name__} is not registered (sparsattn.methods.register), "
                         "so a saved config cannot name it")
    cfg = {}
    fields = dataclasses.fields(m) if dataclasses.is_dataclass(m) else ()
    for f in fields:
        if not f.init or f.name.startswith("_") or f.name == "path":
            continue
        v = getattr(m, f.name)
        if isinstance(v, tuple):
            v = list(v)
        if not _jsonable(v):
            raise ValueError(f"{where}: hyper-parameter {name}.{f.name} = {v!r} cannot be written to config.json")
        cfg[f.name] = v
    if m.needs or hasattr(m, "calibration_kind"):
        if not m.is_fitted:
            raise ValueError(f"{where}: method {name!r} is not fitted (needs {list(m.needs)}): nothing to save")
        if id(m) not in written:
            if out_dir is None:
                raise ValueError(f"{where}: method {name!r} is calibrated: save with save_pretrained(model, path) so "
                                 "that its calibration is written next to the weights")
            rel = f"{_CALIB_DIR}/{name}-{len(written)}" + ("" if getattr(m, "calibration_kind", "") == "directory" else ".json")
            m.save(str(out_dir / rel))
            written[id(m)] = rel
        cfg["path"] = written[id(m)]
    return {"name": name, "config": cfg}


def _choice_entry(c: Optional[_Choice], where: str, out_dir, written) -> Any:
    if c is None:
        return "dense"
    if c.head_src is None:
        return _method_entry(c.methods[0], where, out_dir, written)
    per = [_method_entry(c.methods[i], f"{where} head {h}", out_dir, written) for h, i in enumerate(c.head_src)]
    return {str(h): e for h, e in enumerate(per)}


def _collapse(per_layer: dict) -> Any:
    vals = list(per_layer.values())
    if all(v == vals[0] for v in vals):
        v = vals[0]
        return {"default": v} if isinstance(v, dict) and "name" not in v else v  # a heads mapping stays one level down
    return {str(l): v for l, v in per_layer.items()}


def config_entry(model, out_dir=None) -> dict:
    """config_entry: the ``config.sparsattn`` entry that reloads ``model``'s current patch exactly.

    Every layer's methods with all their hyper-parameters; layers with the same methods collapse to one.
    Calibrated methods write their calibration under ``out_dir/sparsattn_calibration/`` (required then).
    Raises ValueError when ``model`` is not patched or a method cannot be written as JSON.
    """
    from .patch import _PATCH_ATTR

    p = getattr(model, _PATCH_ATTR, None)
    if p is None:
        raise ValueError("model: not patched (call sparsattn.integrations.hf.patch(model, method=...) first)")
    out_dir = Path(out_dir) if out_dir is not None else None
    written: dict = {}
    pre = {l: _choice_entry(b.prefill, f"layer {l} method", out_dir, written) for l, b in p.layers.items()}
    dec = {l: (_choice_entry(b.decode, f"layer {l} decode", out_dir, written) if b.decode is not None else None)
           for l, b in p.layers.items()}
    entry: dict[str, Any] = {"version": 1, "method": _collapse(pre)}
    if any(v is not None for v in dec.values()):
        d = {l: v for l, v in dec.items() if v is not None}
        entry["decode"] = _collapse(d) if len(d) == len(dec) else {str(l): v for l, v in d.items()}
    backends = {b.backend for b in p.layers.values()}
    if len(backends) == 1 and None not in backends:
        entry["backend"] = backends.pop()
    return entry


def save_pretrained(model, save_directory, **kwargs):
    """save_pretrained: ``model.save_pretrained(save_directory, **kwargs)`` with the live patch stored as
    ``config.sparsattn`` (and calibrations next to the weights), so that
    ``AutoModelForCausalLM.from_pretrained(save_directory, attn_implementation="sparsattn")`` reloads it
    sparse (after ``register()``). Returns the entry written."""
    register()
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    entry = config_entry(model, out)
    setattr(model.config, CONFIG_KEY, entry)
    model.save_pretrained(str(out), **kwargs)
    return entry


__all__ = ["CONFIG_KEY", "register", "bind", "bind_running", "config_entry", "config_of", "patch_kwargs",
           "save_pretrained"]
