"""hf.patch: ``patch`` / ``unpatch`` / ``patched`` / ``is_patched`` and the resolution of method specs."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
import weakref
from typing import Any, Optional, Union

import torch

from ...methods.base import Method, get_method, method_class
from .cache import SparseCache
from .forward import _ATTR, NAME, _Layer, sparse_attention_forward
from .heads import _Choice, _mname
from .mask import sparse_attention_mask
from .modules import _base_model, _heads, attention_modules
from .report import PatchReport
from .swap import config_implementations, register_implementation, set_implementation

log = logging.getLogger(__package__)

_PATCH_ATTR = "_sparsattn_patch"
_STATE_ATTR = "_sparsattn_state"

MethodSpec = Union[str, Method, type, dict]

_REGISTERED = False


def _register() -> None:
    """Register the attention and mask functions under ``NAME`` (once, at the first ``patch``)."""
    global _REGISTERED
    if not _REGISTERED:
        register_implementation(NAME, sparse_attention_forward, sparse_attention_mask)
        _REGISTERED = True


# ----------------------------------------------------------------------------------------------
# spec resolution
# ----------------------------------------------------------------------------------------------


def _is_method_like(x) -> bool:
    return isinstance(x, (str, Method)) or (isinstance(x, type) and issubclass(x, Method))


def _resolve_layers(spec, layers: list[int], argname: str, default) -> dict[int, Any]:
    if spec is None:
        return {}
    if _is_method_like(spec):
        return {l: spec for l in layers}
    if not isinstance(spec, dict):
        raise ValueError(f"{argname}: expected a method name, a Method, or a dict {{layer: method, 'default': "
                         f"method}}, got {type(spec).__name__}")
    bad = [key for key in spec if not (key == "default" or (isinstance(key, int) and not isinstance(key, bool)))]
    if bad:
        raise ValueError(f"{argname}: keys must be layer indices (int) or 'default', got {bad}")
    unknown = sorted(key for key in spec if key != "default" and key not in layers)
    if unknown:
        raise ValueError(f"{argname}: unknown layer index(es) {unknown}; the model's attention layers are "
                         f"{layers[0]}..{layers[-1]}")
    dflt = spec.get("default", default)
    return {l: spec.get(l, dflt) for l in layers if spec.get(l, dflt) is not None}


class _Builder:
    """Turns names/classes/instances into Method objects, sharing instances and applying **config."""

    def __init__(self, config: dict):
        self.config = config
        self.used: set = set()
        self.cache: dict = {}

    def build(self, item, argname: str) -> Method:
        if isinstance(item, Method):
            m = item
        else:
            if isinstance(item, str):
                cls = method_class(item)  # ValueError listing valid names
            elif isinstance(item, type) and issubclass(item, Method):
                cls = item
            else:
                raise ValueError(f"{argname}: expected a method name, a Method instance or class, got {item!r}")
            key = id(cls)
            if key not in self.cache:
                fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
                cfg = {kk: vv for kk, vv in self.config.items() if kk in fields}
                self.used |= set(cfg)
                if isinstance(item, str):
                    self.cache[key] = get_method(item, **cfg)
                else:
                    self.cache[key] = cls(**cfg)
            m = self.cache[key]
        if not m.is_fitted:
            raise ValueError(f"{argname}: method {_mname(m)!r} needs {list(m.needs)} before use (call its fit/load)")
        return m

    def choice(self, item, argname: str, Hq: int, layer: int) -> _Choice:
        if isinstance(item, dict):
            bad = [h for h in item if not (h == "default" or (isinstance(h, int) and not isinstance(h, bool)))]
            if bad:
                raise ValueError(f"{argname}[{layer}]: a heads mapping takes query-head indices (int) or 'default', got {bad}")
            out_of = sorted(h for h in item if h != "default" and not 0 <= h < Hq)
            if out_of:
                raise ValueError(f"{argname}[{layer}]: head index(es) {out_of} out of range [0, {Hq})")
            dflt = item.get("default", "dense")
            per_head = [item.get(h, dflt) for h in range(Hq)]
            methods: list[Method] = []
            src = []
            for it in per_head:
                m = self.build(it, f"{argname}[{layer}]")
                pos = next((i for i, x in enumerate(methods) if x is m), None)
                if pos is None:
                    methods.append(m)
                    pos = len(methods) - 1
                src.append(pos)
            if len(methods) == 1:
                return _Choice(methods, None)
            return _Choice(methods, src)
        return _Choice([self.build(item, f"{argname}[{layer}]")], None)


# ----------------------------------------------------------------------------------------------
# the patch object, patch / unpatch / patched
# ----------------------------------------------------------------------------------------------


class _Patch:
    def __init__(self, model, base, modules, configs, saved):
        self.model_ref = weakref.ref(model)
        self.base = base
        self.modules = modules
        self.configs = configs
        self.saved = saved
        self.handles: list = []
        self.layers: dict = {}
        self.frames: list[dict] = []
        self.max_pos = None
        self.report = PatchReport(model)  # what ran: densities, selection times, fallbacks (hf.report)

    def frame(self) -> dict:
        if self.frames:
            return self.frames[-1]
        return {"state": {}}

    def pre_hook(self, module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        am = kwargs.get("attention_mask")
        if am is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            am = args[1]
        x = kwargs.get("input_ids")
        if x is None and args and isinstance(args[0], torch.Tensor):
            x = args[0]
        if x is None:
            x = kwargs.get("inputs_embeds")
        n_new = int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0
        past = 0
        compiled = torch.compiler.is_compiling()  # a compiled step decodes on a static cache: no host sync there
        if cache is not None and hasattr(cache, "get_seq_length") and not compiled:
            try:
                past = int(cache.get_seq_length())
            except Exception:  # noqa: BLE001 - an empty/odd cache: no length
                past = 0
        if self.max_pos and not compiled and past + n_new > self.max_pos:
            warnings.warn(f"sparsattn: context of {past + n_new} tokens is longer than the model's trained length "
                          f"(config.max_position_embeddings={self.max_pos}); quality may degrade", stacklevel=2)
        if isinstance(cache, SparseCache):
            cache.begin_forward(am if isinstance(am, torch.Tensor) and am.dim() == 2 else None)
            state = cache.state
        elif cache is not None and hasattr(cache, "get_seq_length"):
            state = _cache_state(cache, fresh=not compiled and past == 0)
        else:
            state = {}
        if self.frames and self.frames[0].get("inflight"):  # left by hf.auto's bind during a finished forward
            self.frames = [f for f in self.frames if not f.get("inflight")]
        self.frames.append({"state": state, "cache": cache})

    def post_hook(self, module, args, kwargs, output):
        if self.frames:
            self.frames.pop()


def _cache_state(cache, fresh: bool) -> dict:
    """The cross-step method state (``SelectContext.state``) kept on a transformers cache that is not a
    ``SparseCache`` (``DynamicCache``, ``StaticCache``, offloaded or quantized caches): it lives as long
    as the cache object and starts over when a forward begins on an empty cache (``generate`` resets
    and reuses its static cache)."""
    st = cache.__dict__.get(_STATE_ATTR)
    if st is None or fresh:
        st = {}
        cache.__dict__[_STATE_ATTR] = st
    return st


def is_patched(model) -> bool:
    """is_patched: whether ``patch`` is active on ``model``."""
    return getattr(model, _PATCH_ATTR, None) is not None


def patch(model, method: MethodSpec = "dense", *, decode: Optional[MethodSpec] = None,
          heads: Optional[dict] = None, backend: Optional[str] = None, **config):
    """patch: route a transformers decoder's attention through sparsattn (undo with ``unpatch``).

    Args:
        model: a transformers causal LM (or its base model) whose attention modules dispatch through
            ``AttentionInterface`` (Llama, Qwen2/3, Mistral, Gemma/Gemma2/Gemma3, gpt-oss...).
        method: a registered name, a ``Method`` instance or class, or ``{layer: spec, "default": spec}``
            (layers not listed and without "default" run "dense"). A spec may itself be a heads mapping
            ``{query_head: method, "default": method}``: per-head patterns are built by each method and
            stacked (all must share block sizes). Decode-phase methods given here are used at decode
            (prefill then runs dense); prefill-phase methods run dense at decode.
        decode: optional decode-phase methods, same forms as ``method`` (overrides ``method``'s
            decode choice per layer).
        heads: optional ``{query_head: method}`` applied to every layer on top of its method
            (the layer's method stays the default for the other heads).
        backend: kernel backend for ``sparsattn.attention`` ("triton", "flex", "reference"; None =
            automatic); the decode kernel gets it when it is "triton" or "reference".
        **config: hyper-parameters for the methods given by name or class; each key goes to every
            named method that has such a field (a key no method accepts is an error).
    Returns:
        ``model`` (patched in place).
    """
    if backend is not None and backend not in ("triton", "flex", "reference"):
        raise ValueError(f"backend: expected 'triton', 'flex', 'reference' or None, got {backend!r}")
    modules = attention_modules(model)
    layers = list(modules)
    Hq = {l: _heads(m)[0] for l, m in modules.items()}
    Hkv = {l: _heads(m)[1] for l, m in modules.items()}
    b = _Builder(config)
    pre_spec = _resolve_layers(method, layers, "method", "dense")
    dec_spec = _resolve_layers(decode, layers, "decode", None)
    if heads is not None:
        if not isinstance(heads, dict):
            raise ValueError(f"heads: expected a dict {{query_head: method}}, got {type(heads).__name__}")
        for l in layers:
            if isinstance(pre_spec.get(l), dict):
                raise ValueError(f"heads: layer {l} already has a heads mapping in `method`")
            pre_spec[l] = {**heads, "default": pre_spec.get(l, "dense")}
    bindings: dict[int, tuple] = {}
    for l in layers:
        pre = b.choice(pre_spec[l], "method", Hq[l], l) if l in pre_spec else None
        dec = b.choice(dec_spec[l], "decode", Hq[l], l) if l in dec_spec else None
        if pre is not None:
            phases = {m.phase == "decode" for m in pre.methods}
            if phases == {True}:  # decode methods given through `method`
                if dec is None:
                    dec = pre
                pre = None
            elif len(phases) == 2:
                raise ValueError(f"method[{l}]: a heads mapping mixes decode-phase and prefill-phase methods; "
                                 "give decode methods with decode=...")
        if dec is not None and not any(m.phase == "decode" for m in dec.methods):
            raise ValueError(f"decode[{l}]: expected decode-phase methods, got {dec.describe()} "
                             f"(valid: {', '.join(_decode_names()) or 'none registered'})")
        bindings[l] = (pre, dec)
    unused = sorted(set(config) - b.used)
    if unused:
        raise ValueError(f"config: hyper-parameter(s) {unused} are not accepted by any of the named methods")

    old = getattr(model, _PATCH_ATTR, None)
    if old is not None:  # re-patch: keep the original implementations to restore
        saved, configs = old.saved, old.configs
        _detach(model, old, restore=False)
    else:
        configs, saved = config_implementations(modules.values())

    _register()
    base = _base_model(model, modules)
    p = _Patch(model, base, modules, configs, saved)
    p.max_pos = getattr(next(iter(modules.values())).config, "max_position_embeddings", None)
    ref = weakref.ref(p)
    p.layers = {l: _Layer(ref, l, bindings[l][0], bindings[l][1], Hkv[l], backend) for l in layers}
    for l, m in modules.items():  # check before attaching anything
        if any(c is not None and c.needs_pre_rope for c in bindings[l]):
            _check_pre_rope(m, l)
    _attach(model, p)
    log.debug("sparsattn: patched %s: %s", type(model).__name__,
              {l: (pre.describe() if pre else "dense", dec.describe() if dec else "dense")
               for l, (pre, dec) in bindings.items()})
    return model


def _attach(model, p: _Patch) -> None:
    for l, m in p.modules.items():
        lb = p.layers[l]
        setattr(m, _ATTR, lb)
        if any(c is not None and c.needs_pre_rope for c in (lb.prefill, lb.decode)):
            p.handles += _pre_rope_hooks(m, lb)
    p.handles.append(p.base.register_forward_pre_hook(p.pre_hook, with_kwargs=True))
    p.handles.append(p.base.register_forward_hook(p.post_hook, with_kwargs=True, always_call=True))
    for c in p.configs:
        set_implementation(c, NAME)
    model.__dict__[_PATCH_ATTR] = p


def _decode_names() -> list[str]:
    from ...methods import list_methods

    return list_methods("decode")


def _check_pre_rope(m, l: int) -> None:
    if not (hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim")):
        raise ValueError(f"method: layer {l} needs pre-RoPE q/k but {type(m).__name__} has no q_proj/k_proj/head_dim")


def _pre_rope_hooks(m, lb: _Layer) -> list:

    def hook(which):
        def fn(mod, args, out):
            B, T = out.shape[0], out.shape[1]
            lb.pre_rope[which] = out.view(B, T, -1, m.head_dim).transpose(1, 2)
        return fn

    return [m.q_proj.register_forward_hook(hook("q")), m.k_proj.register_forward_hook(hook("k"))]


def _detach(model, p: _Patch, restore: bool) -> None:
    for h in p.handles:
        h.remove()
    p.handles.clear()
    for m in p.modules.values():
        if _ATTR in m.__dict__:
            del m.__dict__[_ATTR]
    if restore:
        for c, s in zip(p.configs, p.saved):
            set_implementation(c, s)
    model.__dict__.pop(_PATCH_ATTR, None)


def unpatch(model):
    """unpatch: restore the exact attention implementation the model had before ``patch``; returns model.

    A model that is not patched is returned unchanged.
    """
    p = getattr(model, _PATCH_ATTR, None)
    if p is not None:
        _detach(model, p, restore=True)
    return model


@contextlib.contextmanager
def patched(model, method: MethodSpec = "dense", **kwargs):
    """patched: context-manager form of ``patch``; restores the previous state on exit (also on error).

    Yields a ``PatchReport`` (``sparsattn.integrations.hf.report``) that records, per layer and head,
    the density reached, the selection time and every fallback to dense with its reason
    (``report.summary()`` prints it; ``report.model`` is the model). If the model was already
    patched, that patch (methods, hooks) is restored on exit.
    """
    prev = getattr(model, _PATCH_ATTR, None)
    patch(model, method, **kwargs)
    rep = getattr(model, _PATCH_ATTR).report
    rep.detailed = True
    try:
        yield rep
    finally:
        cur = getattr(model, _PATCH_ATTR, None)
        if prev is None:
            unpatch(model)
        else:
            if cur is not None:
                _detach(model, cur, restore=False)
            _attach(model, prev)
