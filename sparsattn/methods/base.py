"""The method contract: one registered dataclass per paper, producing patterns.

A method is a ``@register("name")`` dataclass whose fields are its hyper-parameters (with the
paper's defaults) and whose class attributes describe it to the rest of the library:

* ``paper``: title and arXiv id;
* ``phase``: ``"prefill"`` | ``"decode"`` | ``"train"``;
* ``trainable``: whether it has parameters to train;
* ``needs``: what it must be given before use (e.g. ``("calibration",)``) via ``fit``/``load``.

``select(q, k, ctx)`` returns the pattern (plain torch, no model access). Model-dependent setup
happens in an explicit ``fit(...)`` that saves/loads a small JSON or safetensors file.

A method that is not a mask (an approximation such as HyperAttention) defines
``attend(q, k, v, ctx) -> (out, lse)`` instead of ``select``: it computes the attention output
itself (q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``, out ``[B, Hq, Tq, D]``, lse the natural
log-sum-exp ``[B, Hq, Tq]``); its ``select`` returns None and ``computes_output`` is True.
Integrations call ``attend`` for such methods.

Presets (what tooling needs, declared on the method so no tool names it):

* ``example_config()``: a representative configuration (docs, demo, benchmarks);
* ``small_config()``: a configuration for small test shapes (the conformance tests);
* ``full_config(q_len)``: a configuration that keeps every causal pair (None: not expressible);
* ``density_knob(T, target, ctx)`` (prefill): a ``DensityKnob``, the method's settings as a
  function of one searched knob, aimed at ``target`` density at length ``T`` (None: not searched);
* ``budget_config(budget_tokens, ctx)`` (decode): the hyper-parameters for a token budget per KV
  head (None: no budget mapping).

``ctx`` is a ``PresetContext``: the model's shape and the paths of shipped calibrations, so a
calibrated method takes its file from the caller, never from a tool that knows its name.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

import torch

_REGISTRY: dict[str, type] = {}


@dataclass
class SelectContext:
    """SelectContext: what the integration passes to ``Method.select`` besides q and k.

    Attributes:
        layer: index of the attention layer (or None outside a model).
        causal: whether the attention is causal.
        scale: softmax scale (None = 1/sqrt(head_dim)).
        q_offset: absolute position of the first query (chunked prefill / decode).
        state: a dict shared across layers and steps of one forward/generation, owned by the
            integration (cross-layer state such as TidalDecode's positions lives here).
        extras: free-form inputs (e.g. ``positions``, pre-RoPE q/k) an integration may supply.
    """

    layer: Optional[int] = None
    causal: bool = True
    scale: Optional[float] = None
    q_offset: int = 0
    state: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PresetContext:
    """PresetContext: what aiming a method at a density or a budget may need besides the length.

    Attributes:
        n_layers, n_heads: the model's attention layers and query heads (defaults: 8, 8).
        group_size: query heads per KV head (decode budgets split per head group).
        block_size: the key block used by block-granular presets (64).
        calibrations: method name -> path of its calibration file/directory (e.g. a shipped one).
    """

    n_layers: int = 8
    n_heads: int = 8
    group_size: int = 1
    block_size: int = 64
    calibrations: Mapping[str, Optional[str]] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("n_layers", "n_heads", "group_size", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")

    def calibration(self, method: str) -> Optional[str]:
        """The calibration path given for ``method`` (None when absent)."""
        v = self.calibrations.get(method)
        return None if v is None else str(v)


@dataclass
class DensityKnob:
    """DensityKnob: one method's settings as a function of one knob ``x`` (others fixed by rules).

    Attributes:
        method: registered name. knob: the searched hyper-parameter (a label such as ``mask_k/16``).
        lo, hi, integer, increasing: the knob's range, type and direction of the density.
        guess: first value tried.
        config: x -> ``get_method`` keyword arguments (JSON-serialisable).
        label: x -> short human-readable description.
    """

    method: str
    knob: str
    lo: float
    hi: float
    integer: bool
    increasing: bool
    guess: float
    config: Callable[[Any], dict]
    label: Callable[[Any], str]


class Method:
    """Method: base class of registered sparse-attention methods (see module docstring)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    phase: ClassVar[str] = "prefill"
    trainable: ClassVar[bool] = False
    needs: ClassVar[tuple] = ()

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: Optional[SelectContext] = None):
        """Return the pattern for queries ``q [B, Hq, Tq, D]`` and keys ``k [B, Hkv, Tk, D]``
        (None for a method that computes its own output with ``attend``)."""
        if self.computes_output:
            return None
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Optional[SelectContext] = None):
        """Only for methods that are not masks: ``(out [B, Hq, Tq, D], lse [B, Hq, Tq])`` of
        q ``[B, Hq, Tq, D]`` on k/v ``[B, Hkv, Tk, D]`` (see the module docstring)."""
        raise NotImplementedError

    @property
    def computes_output(self) -> bool:
        """True when the method defines ``attend`` (it computes attention itself, no pattern)."""
        return type(self).attend is not Method.attend

    @property
    def is_fitted(self) -> bool:
        """True when every requirement in ``needs`` is satisfied (overridden by calibrated methods)."""
        return not self.needs

    @classmethod
    def example_config(cls) -> dict:
        """Preset: a representative configuration (``get_method`` keyword arguments; {} = defaults)."""
        return {}

    @classmethod
    def small_config(cls) -> dict:
        """Preset: a configuration for small shapes (tens to hundreds of tokens; {} = defaults)."""
        return {}

    @classmethod
    def full_config(cls, q_len: int) -> Optional[dict]:
        """Preset: a configuration keeping every causal pair of ``q_len`` queries (None: none exists)."""
        return None

    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> Optional[DensityKnob]:
        """Preset (prefill): the searched family aimed at density ``target`` at length ``T`` (None: not searched)."""
        return None

    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> Optional[dict]:
        """Preset (decode): the configuration for ``budget_tokens`` tokens per KV head (None: no mapping)."""
        return None

    def config(self) -> dict[str, Any]:
        """The method's hyper-parameters as a JSON-serialisable dict."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, (int, float, str, bool, type(None), list, tuple, dict)):
                out[f.name] = v
        return out


class SelectHook:
    """SelectHook: context manager that routes a method *instance's* ``select`` through
    ``self.on_select(orig, q, k, ctx, *args, **kwargs)`` while active (the class is untouched; the
    instance attribute is removed on exit). Subclasses override ``on_select`` to record or reuse
    patterns; the default just calls ``orig``."""

    def __init__(self, method):
        self.method = method

    def on_select(self, orig, q, k, ctx=None, *args, **kwargs):
        return orig(q, k, ctx, *args, **kwargs)

    def __enter__(self):
        orig = self.method.select

        def select(q, k, ctx=None, *args, **kwargs):
            return self.on_select(orig, q, k, ctx, *args, **kwargs)

        object.__setattr__(self.method, "select", select)
        return self

    def __exit__(self, *exc):
        try:
            object.__delattr__(self.method, "select")
        except AttributeError:
            pass
        return False


def register(name: str):
    """register: class decorator adding a Method subclass to the registry under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"name: method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not issubclass(cls, Method):
            raise ValueError(f"cls: expected a subclass of sparsattn.methods.Method, got {cls!r}")
        if cls.phase not in ("prefill", "decode", "train"):
            raise ValueError(f"{cls.__qualname__}.phase: expected 'prefill', 'decode' or 'train', got {cls.phase!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods(phase: Optional[str] = None) -> list[str]:
    """list_methods: sorted names of registered methods, optionally of one ``phase``."""
    from . import _load_all  # noqa: F401  (imports every method module once)

    _load_all()
    return sorted(n for n, c in _REGISTRY.items() if phase is None or c.phase == phase)


def method_class(name: str) -> type:
    """method_class: the registered class for ``name``; ValueError listing valid names otherwise."""
    names = list_methods()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"method: unknown method {name!r}{hint}; valid methods: {', '.join(names)}")
    return _REGISTRY[name]


def get_method(name: str, **config) -> Method:
    """get_method: build the registered method ``name`` with hyper-parameters ``config``.

    Unknown hyper-parameters raise ValueError listing the valid ones.
    """
    cls = method_class(name)
    valid = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")} if dataclasses.is_dataclass(cls) else set()
    bad = sorted(set(config) - valid)
    if bad:
        raise ValueError(f"config: unknown hyper-parameter(s) {bad} for method {name!r}; valid: {sorted(valid)}")
    return cls(**config)
