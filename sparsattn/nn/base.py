"""The layer contract: trainable sparse-attention layers and sub-quadratic mixers, one file each.

A layer is an ``nn.Module`` subclass registered with ``@register_layer("name")`` in one module of
``sparsattn/nn/layers/`` (sparse attention layers) or ``sparsattn/nn/mixers/`` (approximations and
recurrent mixers). Every module there (other than ``_``-prefixed helpers) is imported on first use
of the registry, so adding a layer is adding one file.

Construction: ``cls(dim, heads, **config)``; the keyword arguments of ``__init__`` after ``dim`` and
``heads`` are the hyper-parameters, with the paper's defaults. Class attributes describe the layer
to the tooling (training command, benchmarks, docs) so that no tool names a layer:

* ``paper``: title and arXiv id;
* ``kind``: ``"sparse"`` (a mask on exact softmax attention), ``"approx"`` (an approximation of
  softmax attention, e.g. hashing / low rank), ``"mixer"`` (a recurrent or convolutional mixer), or
  ``"helper"`` (builds a model from other layers);
* ``layout``: ``"1d"`` (``x [B, T, dim]``) or ``"2d"`` (``x [B, H, W, dim]``);
* ``causal_modes``: the values of the ``causal`` argument the layer supports;
* ``content_based``: whether the sparsity depends on the input (routing, top-k...) rather than a
  fixed structure;
* ``causal_caveat``: non-empty when the causal form lets later tokens influence earlier outputs
  through the paper's own algorithm (a warning is given once when such a layer is built causal);
  an instance's ``caveat()`` says whether it applies to that configuration (default: when built
  causal);
* ``presets``: named example configurations, e.g. ``{"mqar": {...}}``, that the training command
  and the benchmarks use (``"default"`` is the empty dict); a key ``"task:T"`` (e.g.
  ``"pathfinder:256"``) is applied over ``presets[task]`` at sequence length ``T`` only
  (``preset_config``), for hyper-parameters that must follow the input size.

Optional class hooks (a layer declares one by defining it; tools look for it, never for a name):

* ``fidelity_grid(D, seed=0)`` (classmethod; the approximations): the layer's rows of the fidelity grid
  (``sparsattn.eval.approx_quality.method_grid``) for head width ``D``, a list of dicts with
  ``method`` and ``config`` labels (unique; ``method`` is the registered name or ``name-variant``),
  ``run(q, k, v, stats) -> (out, lse)`` on ``[B, H, T, D]`` (causal; ``stats`` None or a dict
  accumulating ``"pairs"`` / ``"lowrank"``) and ``exact_part(q, k, v)`` -> the lse of the exactly
  computed pairs (None when there are none); its budgets live in the layer's file.

``forward(x)`` returns ``y`` with the shape of ``x``. A layer with an auxiliary training loss
(distillation, commitment) returns it from ``extra_loss()`` after a forward (None otherwise).

``cost(T)`` reports what one forward over ``T`` tokens computes, for the "accuracy vs compute" axis
of the training harness: ``density`` (computed query-key pairs / causal pairs, or / all pairs when
not causal) and ``flops`` (attention-core FLOPs of one sequence, projections excluded). The default
is dense softmax attention; sparse layers report their pattern (``pattern_cost``), mixers their own.

Attention inside a layer goes through ``attend`` (``sparsattn.attention`` with the backend chosen
by ``attention_backend(...)`` when set, e.g. ``"reference"`` to train on the CPU without the
Triton interpreter; on the reference backend a batch-shared pattern runs with the batch folded into
the heads, the same result several times faster).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import pkgutil
import warnings
from typing import Any, ClassVar, Optional

import torch
from torch import nn

_REGISTRY: dict[str, type] = {}
_WARNED: set = set()
_LOADED = False
_KINDS = ("sparse", "approx", "mixer", "helper")


class Layer(nn.Module):
    """Layer: base class of registered layers and mixers (see the module docstring)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    kind: ClassVar[str] = "sparse"
    layout: ClassVar[str] = "1d"
    causal_modes: ClassVar[tuple] = (True, False)
    content_based: ClassVar[bool] = False
    presets: ClassVar[dict] = {}
    #: non-empty when the causal form is known to let later tokens influence earlier outputs (a
    #: property of the paper's algorithm kept on purpose, e.g. balanced routing); said at construction
    causal_caveat: ClassVar[str] = ""

    def caveat(self) -> str:
        """The causal caveat that applies to this instance (``causal_caveat`` when built causal, else
        ""); a layer whose caveat depends on more of its configuration overrides this."""
        return self.causal_caveat if getattr(self, "causal", True) else ""

    def extra_loss(self) -> Optional[torch.Tensor]:
        """The auxiliary loss of the last forward (distillation, commitment), or None."""
        return None

    def config(self) -> dict[str, Any]:
        """The layer's constructor arguments (``dim``, ``heads`` and hyper-parameters) as a dict."""
        return dict(getattr(self, "_config", {}))

    def cost(self, T: int) -> dict[str, float]:
        """What one forward over ``T`` tokens computes: ``{"density", "flops"}`` (module docstring).

        Default: dense softmax attention (causal when the layer's ``causal`` is True or absent),
        ``flops = 4 * pairs * dim`` (QK^T and PV, multiply-add = 2 FLOPs).
        """
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T: expected a positive int, got {T!r}")
        cfg = self.config()
        causal = bool(cfg.get("causal", True))
        pairs = T * (T + 1) / 2 if causal else float(T * T)
        return {"density": 1.0, "flops": 4.0 * pairs * int(cfg.get("dim", 0))}


def preset_config(cls, task: str, seq_len: Optional[int] = None) -> dict:
    """preset_config: the configuration a tool gives layer class ``cls`` on ``task``: its
    ``presets[task]``, then ``presets[f"{task}:{seq_len}"]`` over it when ``seq_len`` is given
    (a copy; empty when the layer has neither)."""
    presets = getattr(cls, "presets", {}) or {}
    cfg = dict(presets.get(task, {}))
    if seq_len is not None:
        cfg.update(presets.get(f"{task}:{seq_len}", {}))
    return cfg


def register_layer(name: str):
    """register_layer: class decorator adding a ``Layer`` subclass to the registry under ``name``.

    It records the constructor arguments of every instance (``layer.config()``) and checks the
    class attributes the tooling dispatches on.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"name: layer {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not (isinstance(cls, type) and issubclass(cls, Layer)):
            raise ValueError(f"cls: expected a subclass of sparsattn.nn.Layer, got {cls!r}")
        if cls.kind not in _KINDS:
            raise ValueError(f"{cls.__qualname__}.kind: expected one of {_KINDS}, got {cls.kind!r}")
        if cls.layout not in ("1d", "2d"):
            raise ValueError(f"{cls.__qualname__}.layout: expected '1d' or '2d', got {cls.layout!r}")
        init = cls.__init__
        sig = inspect.signature(init)

        def __init__(self, *args, **kwargs):
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            init(self, *args, **kwargs)
            msg = self.caveat() if cls.causal_caveat else ""
            if msg and name not in _WARNED:
                _WARNED.add(name)
                warnings.warn(f"{name}: {msg}", stacklevel=2)
            cfg = dict(bound.arguments)
            cfg.pop("self", None)
            for k, p in sig.parameters.items():
                if p.kind is inspect.Parameter.VAR_KEYWORD:
                    cfg.update(cfg.pop(k, {}))
            self._config = cfg

        __init__.__doc__ = init.__doc__
        __init__.__signature__ = sig
        cls.__init__ = __init__
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for sub in ("layers", "mixers"):
        pkg = importlib.import_module(f"{__package__}.{sub}")
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{pkg.__name__}.{mod.name}")


def list_layers(kind: Optional[str] = None) -> list[str]:
    """list_layers: sorted names of registered layers, optionally of one ``kind``
    (``"sparse"``, ``"approx"``, ``"mixer"``, ``"helper"``)."""
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"kind: expected one of {_KINDS} or None, got {kind!r}")
    _load_all()
    return sorted(n for n, c in _REGISTRY.items() if kind is None or c.kind == kind)


def layer_class(name: str) -> type:
    """layer_class: the registered class for ``name``; ValueError listing valid names otherwise."""
    names = list_layers()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"layer: unknown layer {name!r}{hint}; valid layers: {', '.join(names)}")
    return _REGISTRY[name]


def hyper_parameters(name: str) -> dict[str, Any]:
    """hyper_parameters: the keyword hyper-parameters of layer ``name`` with their defaults."""
    sig = inspect.signature(layer_class(name).__init__)
    return {k: p.default for k, p in list(sig.parameters.items())[3:]
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}


def get_layer(name: str, dim: int, heads: int, **config) -> Layer:
    """get_layer: build the registered layer ``name`` for model width ``dim`` with ``heads`` heads.

    Unknown hyper-parameters raise ValueError listing the valid ones; ``dim`` must be a positive int
    divisible by ``heads``.
    """
    cls = layer_class(name)
    for arg, v in (("dim", dim), ("heads", heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{arg}: expected a positive int, got {v!r}")
    if dim % heads:
        raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
    valid = hyper_parameters(name)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD
                       for p in inspect.signature(cls.__init__).parameters.values())
    bad = sorted(set(config) - set(valid))
    if bad and not takes_kwargs:
        raise ValueError(f"config: unknown hyper-parameter(s) {bad} for layer {name!r}; valid: {sorted(valid)}")
    return cls(dim, heads, **config)


# ------------------------------------------------------------------------------------------------
# attention inside layers: one entry point, one backend switch, one cost rule
# ------------------------------------------------------------------------------------------------

_BACKEND: list = [None]


@contextlib.contextmanager
def attention_backend(name: Optional[str]):
    """attention_backend: context manager choosing the backend of ``attend`` (``"triton"``,
    ``"flex"``, ``"reference"`` or None = the library's table). The training harness uses
    ``"reference"`` on the CPU (the Triton interpreter is for tests, far too slow to train)."""
    if name is not None and name not in ("triton", "flex", "reference"):
        raise ValueError(f"name: expected 'triton', 'flex', 'reference' or None, got {name!r}")
    prev = _BACKEND[0]
    _BACKEND[0] = name
    try:
        yield
    finally:
        _BACKEND[0] = prev


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern=None, *, causal: bool = False,
           scale: Optional[float] = None, return_lse: bool = False):
    """attend: ``sparsattn.attention(q, k, v, pattern, causal=..., scale=..., return_lse=...)`` with
    the backend of ``attention_backend`` (q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]``).

    On the reference backend (the CPU training path) the batch is folded into the heads (the
    pattern's per-sequence / per-head block lists tiled to match; not with GQA per-head patterns or
    key columns): one chunked loop instead of one per sequence, the same result.
    """
    from ..api import attention, choose_backend

    backend = _BACKEND[0]
    B, Hq = q.shape[0], q.shape[1]
    foldable = pattern is None or (pattern.columns is None and pattern.batch in (1, B)
                                   and (pattern.heads == 1 or pattern.heads == Hq == k.shape[1]))
    if foldable and B > 1 and choose_backend(q, pattern, backend=backend) == "reference":
        if pattern is not None and (pattern.batch > 1 or pattern.heads > 1):  # one pattern head per (b, h)
            def rep(t):
                if t is None:
                    return None
                t = t.expand(B, Hq, *t.shape[2:])
                return t.reshape(1, B * Hq, *t.shape[2:]).contiguous()
            pattern = dataclasses.replace(pattern, kv_num_blocks=rep(pattern.kv_num_blocks),
                                          kv_indices=rep(pattern.kv_indices),
                                          full_kv_num_blocks=rep(pattern.full_kv_num_blocks),
                                          full_kv_indices=rep(pattern.full_kv_indices),
                                          mask_ids=rep(pattern.mask_ids), _cache={})
        fold = lambda t: t.reshape(1, B * t.shape[1], *t.shape[2:])  # noqa: E731
        res = attention(fold(q), fold(k), fold(v), pattern, causal=causal, scale=scale, return_lse=return_lse,
                        backend="reference")
        if return_lse:
            out, lse = res
            return out.reshape(q.shape[:3] + out.shape[3:]), lse.reshape(q.shape[:3])
        return res.reshape(q.shape[:3] + res.shape[3:])
    return attention(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse, backend=backend)


def pattern_cost(pattern, heads: int, head_dim: int) -> dict[str, float]:
    """pattern_cost: ``{"density", "flops"}`` of a ``BlockPattern`` used by ``heads`` query heads of
    width ``head_dim`` (flops per sequence: 4 * computed pairs * head_dim, summed over heads)."""
    comp, _ = pattern.pair_counts()
    per_head = float(comp.sum()) / (comp.shape[0] * comp.shape[1])
    return {"density": float(pattern.density), "flops": 4.0 * per_head * heads * head_dim}
