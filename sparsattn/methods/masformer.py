"""masformer: MASFormer's mixed attention spans across layers (arXiv 2310.12442), as a composition."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .. import patterns
from ._common import check_inputs, check_pow2
from .base import DensityKnob, Method, PresetContext, SelectContext, get_method, register


@register("masformer")
@dataclass
class MASFormer(Method):
    """MASFormer: full (causal) attention in the layers ``full_layers``, another registered method
    (``inner``, built with ``inner_config``) in every other layer (Efficient Long-Range Transformers:
    You Need to Attend More, but Not Necessarily at Every Layer, arXiv 2310.12442).

    ``select`` dispatches on ``ctx.layer`` (required). Any registered prefill method can be the
    inner one (``"a_shape"``: sink + sliding window, the paper's short-span layers; ``"s2_attention"``
    with ``full_layers`` every 2nd layer gives Phi-3-small's hybrid). A calibrated inner method must
    be fitted: pass a fitted instance as ``inner``.

    Defaults: the paper uses a small number of full layers (e.g. a few of 24 for its 1.3B model)
    and studies where to put them; the exact counts/placement were not retrieved (METHODS.md C7
    [mem]), so ``full_layers`` defaults to none and must be chosen for a model.

    Args:
        full_layers: layer indices with full attention.
        inner: registered method name (or a Method instance) for the other layers.
        inner_config: hyper-parameters of ``inner`` when given by name.
        block_size: block size of the full layers' causal pattern.
    """

    paper = ("Efficient Long-Range Transformers: You Need to Attend More, but Not Necessarily at Every Layer "
             "(MASFormer, arXiv 2310.12442)")
    phase = "prefill"
    full_layers: tuple = ()
    inner: Union[str, Any] = "a_shape"
    inner_config: dict = field(default_factory=dict)
    block_size: int = 64
    _inner: Optional[Method] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.full_layers, int) or not isinstance(self.full_layers, (tuple, list)) or \
                any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.full_layers):
            raise ValueError(f"full_layers: expected a tuple of layer indices >= 0, got {self.full_layers!r}")
        self.full_layers = tuple(sorted(set(self.full_layers)))
        check_pow2("block_size", self.block_size)
        if not isinstance(self.inner_config, dict):
            raise ValueError(f"inner_config: expected a dict of hyper-parameters, got {self.inner_config!r}")
        if isinstance(self.inner, Method):
            if self.inner_config:
                raise ValueError("inner_config: expected {} when inner is a Method instance")
            self._inner = self.inner
        elif isinstance(self.inner, str):
            if self.inner == "masformer":
                raise ValueError("inner: expected another method than 'masformer'")
            self._inner = get_method(self.inner, **self.inner_config)
        else:
            raise ValueError(f"inner: expected a registered method name or a Method instance, got {self.inner!r}")
        if self._inner.phase != "prefill":
            raise ValueError(f"inner: expected a prefill method, got {self._inner.name!r} (phase {self._inner.phase!r})")

    @property
    def is_fitted(self) -> bool:
        return self._inner.is_fitted

    def config(self) -> dict:
        out = super().config()
        if isinstance(self.inner, Method):
            out["inner"] = self.inner.name
            out["inner_config"] = self.inner.config()
        return out

    @classmethod
    def small_config(cls) -> dict:
        return {"full_layers": (1, 3), "inner": "a_shape",
                "inner_config": {"n_init": 8, "n_local": 48, "block_size": 32}, "block_size": 32}

    @classmethod
    def full_config(cls, q_len: int) -> dict:
        return {"full_layers": (0,), "inner": "a_shape", "inner_config": {"n_init": 8, "n_local": 48}, "block_size": 32}

    # -- presets (evaluation tooling) -----------------------------------------------------------
    @classmethod
    def density_knob(cls, T: int, target: float, ctx: PresetContext) -> DensityKnob:
        """Preset: layer 0 dense + A-shape in the other layers. A dense layer alone is 1/L of the density:
        when it leaves room (inner target (L d - 1) / (L - 1) >= d / 2) A-shape's knob is searched for the
        overall density; else the A-shape layers take A-shape's own setting for ``target`` (``proxy``)."""
        from .a_shape import AShape

        L, blk = ctx.n_layers, ctx.block_size
        inner_target = (L * target - 1) / (L - 1) if L > 1 else target
        roomy = inner_target >= 0.5 * target
        fam = AShape.density_knob(T, inner_target if roomy else target, ctx)

        def cfg(x):
            return dict(full_layers=[0], inner="a_shape", inner_config=fam.config(x), block_size=blk)
        note = ("inner a_shape searched for the overall density" if roomy else
                f"one dense layer of {L} is already {1 / L:.3f} density: the other layers use a_shape's "
                f"setting for {target:g}")
        return DensityKnob(cls.name, fam.knob, fam.lo, fam.hi, True, fam.increasing, fam.guess, cfg,
                           lambda x: "L0 dense + " + fam.label(x), note=note, proxy=None if roomy else fam)

    def static_pattern_key(self, layer):
        """Preset: static when the inner method's pattern is (a full layer's causal pattern always is)."""
        inner = self._inner.static_pattern_key(layer)
        return None if inner is None else (layer in self.full_layers, inner)

    def select(self, q, k, ctx: Optional[SelectContext] = None):
        ctx = ctx or SelectContext()
        check_inputs("masformer", q, k, ctx, need_causal=False)
        if ctx.layer is None:
            raise ValueError("ctx.layer: masformer needs the layer index to choose full or inner attention, got None")
        if int(ctx.layer) in self.full_layers:
            build = patterns.causal if ctx.causal else patterns.dense
            return build(q.shape[2], k.shape[2], block_q=self.block_size, device=q.device)
        return self._inner.select(q, k, ctx)
