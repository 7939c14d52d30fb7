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
* ``presets``: named example configurations, e.g. ``{"mqar": {...}}``, that the training command
  and the benchmarks use (``"default"`` is the empty dict).

``forward(x)`` returns ``y`` with the shape of ``x``. A layer with an auxiliary training loss
(distillation, commitment) returns it from ``extra_loss()`` after a forward (None otherwise).
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from typing import Any, ClassVar, Optional

import torch
from torch import nn

_REGISTRY: dict[str, type] = {}
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

    def extra_loss(self) -> Optional[torch.Tensor]:
        """The auxiliary loss of the last forward (distillation, commitment), or None."""
        return None

    def config(self) -> dict[str, Any]:
        """The layer's constructor arguments (``dim``, ``heads`` and hyper-parameters) as a dict."""
        return dict(getattr(self, "_config", {}))


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
