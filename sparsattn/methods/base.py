"""The method contract: one registered dataclass per paper, producing patterns.

A method is a ``@register("name")`` dataclass whose fields are its hyper-parameters (with the
paper's defaults) and whose class attributes describe it to the rest of the library:

* ``paper``: title and arXiv id;
* ``phase``: ``"prefill"`` | ``"decode"`` | ``"train"``;
* ``trainable``: whether it has parameters to train;
* ``needs``: what it must be given before use (e.g. ``("calibration",)``) via ``fit``/``load``;
* ``exact``: True when the pattern is always exact attention (``dense``): evaluation tools run the
  unpatched model for it as the baseline.

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
* ``density_variants(T, target, ctx)`` (prefill): ``{variant: DensityKnob}``, other searched families
  of the method (e.g. SeerAttention's gate in threshold mode instead of top-k), evaluated by the
  drivers as ``"name:variant"`` when asked for ({} = none; never in a default grid);
* ``budget_config(budget_tokens, ctx)`` (decode): the hyper-parameters for a token budget per KV
  head (None: no budget mapping);
* ``calibrate_from_qk(qs, ks, config)``: for a method calibrated on captured per-layer q/k alone,
  the configuration entries it fits (e.g. Double Sparsity's channels; None: not calibrated so);
* ``slow``: a non-empty note when running the method is slow enough to leave it out of default
  evaluation grids (the note is shown to the user);
* ``fixed_settings(T, ctx)`` (prefill): ``FixedSetting`` configurations evaluated as they are at
  length ``T`` instead of being aimed at a density (dense attention; a shipped calibration whose
  budget the calibration fixes, taken from ``ctx``); [] = none;
* ``static_pattern_key(layer)`` (on an instance): a hashable key such that two ``select`` calls with
  the same key, the same q/k shapes and the same context apart from ``layer`` return the same
  pattern, i.e. the pattern depends only on (layer, lengths), not on q/k values (A-shape: ``()``;
  a per-layer calibrated plan: ``(layer,)``); tools may reuse such a pattern. None (default): it
  depends on the data.

The evaluation drivers build their default method lists from ``list_methods(phase)`` and these
presets (a prefill method with ``density_knob`` or ``fixed_settings``, a decode method with
``budget_config``; ``declares(cls, preset)`` says whether a class overrides one), so a method
reaches them without an edit anywhere else. A ``DensityKnob`` may carry a ``note`` and a ``proxy``
(the knob is then searched on another method's density and mapped, e.g. MASFormer's inner A-shape
when one dense layer alone exceeds the target). ``PresetContext.work_dir`` is where a preset may
write a derived file (e.g. RazorAttention's retrieval-head subset); None = write nothing.

``ctx`` is a ``PresetContext``: the model's shape and the paths of shipped calibrations, so a
calibrated method takes its file from the caller, never from a tool that knows its name.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

import torch

_REGISTRY: dict[str, type] = {}


#: SelectContext's typed fields that the old string keys of ``extras`` read and write (compatibility)
_TYPED_EXTRAS = ("phase", "v", "q_lens", "kv_lens", "padding_side", "position_ids", "sliding_window",
                 "num_kv_groups", "q_pre_rope", "k_pre_rope", "prefill_q",
                 "label_bytes", "h2d_bytes", "mask_refresh", "full_step")


class _Extras(MutableMapping):
    """The ``SelectContext.extras`` mapping: free-form keys stored here, and the names of typed
    fields (``_TYPED_EXTRAS``) forwarded to the context's attributes, so code written against the
    old string keys (``ctx.extras["kv_lens"]``) keeps working. A typed field that is None counts
    as absent."""

    __slots__ = ("_ctx", "_free")

    def __init__(self, ctx: "SelectContext", free: Optional[Mapping] = None):
        self._ctx, self._free = ctx, {}
        for key, val in (free or {}).items():
            self[key] = val

    def __getitem__(self, key):
        if key in _TYPED_EXTRAS:
            val = getattr(self._ctx, key)
            if val is None:
                raise KeyError(key)
            return val
        return self._free[key]

    def __setitem__(self, key, val):
        if key in _TYPED_EXTRAS:
            setattr(self._ctx, key, val)
        else:
            self._free[key] = val

    def __delitem__(self, key):
        if key in _TYPED_EXTRAS:
            if getattr(self._ctx, key) is None:
                raise KeyError(key)
            setattr(self._ctx, key, None)
        else:
            del self._free[key]

    def __iter__(self):
        yield from (k for k in _TYPED_EXTRAS if getattr(self._ctx, k) is not None)
        yield from self._free

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


@dataclass(eq=False)
class SelectContext:
    """SelectContext: what the integration passes to ``Method.select`` besides q and k, and what
    the method reports back; typed fields, None = not given.

    Attributes (in, set by the caller):
        layer: index of the attention layer (or None outside a model).
        causal: whether the attention is causal.
        scale: softmax scale (None = 1/sqrt(head_dim)).
        q_offset: absolute position of the first query (chunked prefill / decode).
        state: a dict shared across layers and steps of one forward/generation, owned by the
            integration (cross-layer state such as TidalDecode's positions lives here).
        phase: ``"prefill"`` or ``"decode"`` (None outside an integration).
        v: the values ``[B, Hkv, Tk, D]`` aligned like k (prefill; LongHeads' chunk keys).
        q_lens, kv_lens: ``[B]`` valid query / key lengths of a padded batch (None: all valid).
        padding_side: ``"right"`` or ``"left"``: where the padding of q/k given to ``select`` is.
        position_ids: the model's position ids, when it passes them.
        sliding_window: the layer's sliding window (None: none).
        num_kv_groups: query heads per KV head.
        q_pre_rope, k_pre_rope: q/k before RoPE ``[B, H, T, D]`` (methods with ``needs_pre_rope``).
        prefill_q: the prefill queries ``[B, Hq, Tp, D]`` (RetrievalAttention's attention-aware index).

    Attributes (out, set by the method during ``select``):
        label_bytes: bytes of Double Sparsity's label cache after this call.
        h2d_bytes: ``{kind: bytes}`` moved host -> device by an offloaded method this call.
        mask_refresh: whether HiP decode recomputed its mask this step.
        full_step: whether Recycled Attention ran a full-attention step.

    ``extras``: free-form keys for third-party use. The old string keys of the typed fields
    (``extras["kv_lens"]``, ...) read and write those fields, so older code keeps working.
    """

    layer: Optional[int] = None
    causal: bool = True
    scale: Optional[float] = None
    q_offset: int = 0
    state: dict = field(default_factory=dict)
    extras: MutableMapping = field(default_factory=dict)
    phase: Optional[str] = None
    v: Optional[torch.Tensor] = None
    q_lens: Optional[torch.Tensor] = None
    kv_lens: Optional[torch.Tensor] = None
    padding_side: Optional[str] = None
    position_ids: Optional[torch.Tensor] = None
    sliding_window: Optional[int] = None
    num_kv_groups: Optional[int] = None
    q_pre_rope: Optional[torch.Tensor] = None
    k_pre_rope: Optional[torch.Tensor] = None
    prefill_q: Optional[torch.Tensor] = None
    label_bytes: Optional[int] = None
    h2d_bytes: Optional[dict] = None
    mask_refresh: Optional[bool] = None
    full_step: Optional[bool] = None

    def __post_init__(self):
        free = self.extras
        if free is not None and not isinstance(free, Mapping):
            raise ValueError(f"extras: expected a dict, got {type(free).__name__}")
        if isinstance(free, _Extras):  # dataclasses.replace / copy: keep only the free-form keys
            free = free._free
        given = dict(free or {})
        self.extras = _Extras(self)
        for key, val in given.items():
            if key in _TYPED_EXTRAS and getattr(self, key) is not None:
                continue  # the typed field given explicitly wins over the old string key
            self.extras[key] = val


@dataclass(frozen=True)
class PresetContext:
    """PresetContext: what aiming a method at a density or a budget may need besides the length.

    Attributes:
        n_layers, n_heads: the model's attention layers and query heads (defaults: 8, 8).
        group_size: query heads per KV head (decode budgets split per head group).
        block_size: the key block used by block-granular presets (64).
        calibrations: method name -> path of its calibration file/directory (e.g. a shipped one).
        work_dir: a folder where a preset may write derived files (None: presets write nothing).
    """

    n_layers: int = 8
    n_heads: int = 8
    group_size: int = 1
    block_size: int = 64
    calibrations: Mapping[str, Optional[str]] = field(default_factory=dict)
    work_dir: Optional[str] = None

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
        note: a remark recorded with the chosen setting ("" = none).
        proxy: when set, ``x`` is searched on the proxy's method and configuration (its density aimed
            at the same target) and ``config(x)``/``label(x)`` map that ``x``; the method's own density
            is then measured once, not searched (None: ``x`` is searched on the method itself).
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
    note: str = ""
    proxy: Optional["DensityKnob"] = None


@dataclass
class FixedSetting:
    """FixedSetting: one configuration a method is evaluated at as it is (``Method.fixed_settings``).

    Attributes:
        label: short description (e.g. ``"shipped plan"``).
        config: ``get_method`` keyword arguments (JSON-serialisable).
        target: the density it stands for (1.0 for dense); None = set by a calibration ("calibrated").
        note: a remark recorded with it.
    """

    label: str
    config: dict
    target: Optional[float] = None
    note: str = ""


class Method:
    """Method: base class of registered sparse-attention methods (see module docstring)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    phase: ClassVar[str] = "prefill"
    trainable: ClassVar[bool] = False
    needs: ClassVar[tuple] = ()
    slow: ClassVar[str] = ""
    #: True when the pattern is always exact attention (dense): tools run the unpatched model as the baseline
    exact: ClassVar[bool] = False
    #: True for the methods the main job (``sparsattn demo``) compares: training-free, no calibration,
    #: fast enough on the CPU for a few-minute run
    demo: ClassVar[bool] = False

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
    def density_variants(cls, T: int, target: float, ctx: PresetContext) -> dict:
        """Preset (prefill): ``{variant: DensityKnob}``, other searched families evaluated as ``"name:variant"``
        when a tool is asked for them ({} = none)."""
        return {}

    @classmethod
    def budget_config(cls, budget_tokens: int, ctx: PresetContext) -> Optional[dict]:
        """Preset (decode): the configuration for ``budget_tokens`` tokens per KV head (None: no mapping)."""
        return None

    @classmethod
    def calibrate_from_qk(cls, qs: list, ks: list, config: dict) -> Optional[dict]:
        """Preset: configuration entries fitted from captured q/k (one pair per layer) for a method
        with hyper-parameters ``config`` (None: the method is not calibrated from q/k alone)."""
        return None

    @classmethod
    def swap_configs(cls) -> dict:
        """Preset: ``{label: config}`` evaluated by swapping the method into a model's last layers
        (methods that compute their own output, the approximations: ``eval.approx_quality``'s swap
        part reads passkey and perplexity change there); empty when the method is not evaluated so."""
        return {}

    @classmethod
    def fixed_settings(cls, T: int, ctx: PresetContext) -> list:
        """Preset (prefill): ``FixedSetting`` configurations evaluated as they are at length ``T`` ([] = none)."""
        return []

    def static_pattern_key(self, layer: Optional[int]):
        """Preset: a key under which this instance's pattern depends only on (layer, lengths) (None: on the data)."""
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


class _ClassOrInstance:
    """Descriptor: the wrapped function receives ``(cls, instance_or_None, *args, **kwargs)``, so one
    name works on the class (build a new instance) and on an instance (fill it in)."""

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls=None):
        cls = cls if cls is not None else type(obj)

        def bound(*args, **kwargs):
            return self.func(cls, obj, *args, **kwargs)

        bound.__doc__, bound.__name__ = self.func.__doc__, self.func.__name__
        return bound


def _load(cls, self, path, *, expect_shape=None, **config):
    """load(path, *, expect_shape=None, **config): read a calibration written by ``save`` through
    ``sparsattn.calibration``'s checked loader. On the class: a new fitted instance with
    hyper-parameters ``config``; on an instance: fills that instance in (keeping its
    hyper-parameters) and returns it. ``expect_shape``: the model shape the file must record
    (refused otherwise, the mismatching field named)."""
    if self is None:
        self = cls(**config)
    elif config:
        raise ValueError(f"config: {sorted(config)} can only be given when loading on the class "
                         f"({cls.__name__}.load(path, ...)), not on an instance")
    path = _fspath(path, cls)
    self._read_calibration(path, expect_shape=expect_shape)
    self.path = path
    return self


def _fspath(path, cls) -> str:
    import os

    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"path: expected a path to a {cls.__name__} calibration {cls.calibration_kind}, got {path!r}")
    return path


class Calibrated:
    """Calibrated: the one calibration contract of a method fitted offline (mixin before ``Method``).

    * ``path``: the one dataclass field naming the calibration the method reads (a JSON file, or a
      directory for ``calibration_kind = "directory"``); None = fitted in memory or not yet.
      Given at construction, it is read at once (``_load_path`` in ``__post_init__``).
    * ``fit(data, *, path=None, **options)`` (classmethod): fit from captured tensors (no model);
      returns a fitted instance, saved to ``path`` when given.
    * ``save(path) -> str``: write the calibration (through ``sparsattn.calibration``); returns the path.
    * ``load(path, **config)``: on the class a new fitted instance, on an instance fills it in.

    Model-level fitting (running a whole model to capture or profile) lives above ``methods/`` in
    ``sparsattn.calibrate.<method>``, behind ``sparsattn calibrate <method>``. A subclass implements
    ``fit``, ``save``, ``_read_calibration(path, expect_shape=None)`` and ``is_fitted``.
    """

    calibration_kind: ClassVar[str] = "JSON file"
    path: Optional[str] = None

    load = _ClassOrInstance(_load)

    @classmethod
    def fit(cls, data, *, path=None, **options):
        """fit: a fitted instance from captured tensors ``data`` (saved to ``path`` when given)."""
        raise NotImplementedError(f"{cls.__name__}.fit")

    def save(self, path) -> str:
        """save: write the calibration to ``path``; returns the path written."""
        raise NotImplementedError(f"{type(self).__name__}.save")

    def _read_calibration(self, path: str, *, expect_shape=None) -> None:
        raise NotImplementedError(f"{type(self).__name__}._read_calibration")

    @classmethod
    def random_calibration(cls, path, *, q_heads: int, kv_heads: int, head_dim: int, layers: int = 1,
                           seed: int = 0) -> Optional[str]:
        """Preset: write a calibration of random values for a model of this attention shape (``layers``
        layers) to ``path`` and return the path written (None: the method provides none). For
        benchmarks that time a calibrated method on random inputs: the cost of ``select`` does not
        depend on the fitted values; its quality is meaningless."""
        return None

    def _load_path(self) -> None:
        """Read ``self.path`` when given (call from ``__post_init__``); a PathLike becomes a str."""
        if self.path is not None:
            self.path = _fspath(self.path, type(self))
            self._read_calibration(self.path)


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


def declares(cls: type, preset: str) -> bool:
    """declares: whether method class ``cls`` overrides the preset ``preset`` of ``Method`` (e.g.
    ``"budget_config"``, ``"density_knob"``, ``"fixed_settings"``, ``"calibrate_from_qk"``)."""
    base = getattr(Method, preset, None)
    if base is None:
        raise ValueError(f"preset: expected a preset of sparsattn.methods.base.Method, got {preset!r}")
    own = getattr(cls, preset)
    return getattr(own, "__func__", own) is not getattr(base, "__func__", base)


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
