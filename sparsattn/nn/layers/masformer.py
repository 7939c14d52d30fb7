"""masformer: MASFormer's mixed attention spans across layers, as a model-building helper (arXiv 2310.12442)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ... import patterns
from ..base import attend, get_layer, hyper_parameters, layer_class, pattern_cost, register_layer
from ._qkv import QKVLayer, check_int, check_pow2


def _full_set(full_layers, n_layers: int) -> set:
    return {i % n_layers for i in full_layers}


def masformer_mixers(n_layers: int, full_layers: Sequence[int] = (-1,), inner: str = "window",
                     inner_config: Optional[dict] = None, window: int = 256) -> list:
    """masformer_mixers: the per-block layer list of a MASFormer model for the training harness:
    ``"dense"`` in ``full_layers`` (negative indices count from the top), the sparse layer elsewhere
    (``inner="window"``: causal sliding window of ``window`` tokens; or any registered layer name
    with ``inner_config``), e.g. ``train_layer(masformer_mixers(4, (1, 3), "s2"), "mqar")``."""
    check_int("n_layers", n_layers)
    full = _full_set(full_layers, n_layers)
    if inner == "window":
        sparse = ("masformer", {"layer_index": 0, "n_layers": 1, "full_layers": (), "window": window})
    else:
        layer_class(inner)
        sparse = (inner, dict(inner_config or {}))
    return ["dense" if i in full else sparse for i in range(n_layers)]


@register_layer("masformer")
class MASFormer(QKVLayer):
    """MASFormer: full causal attention in a few layers (``full_layers``), a short span elsewhere
    (Efficient Long-Range Transformers: You Need to Attend More, but Not Necessarily at Every Layer,
    arXiv 2310.12442).

    A model-building helper (``kind="helper"``): the harness passes each block's ``layer_index`` and
    the model's ``n_layers``; this block is exact dense attention when its index is in
    ``full_layers`` (negative = from the top), otherwise the sparse layer: ``inner="window"`` (the
    paper's sliding window of ``window`` tokens, through ``sparsattn.attention``) or any registered
    layer (``inner="s2"`` with full layers every 2nd layer is Phi-3-small's hybrid), built with
    ``inner_config``. ``masformer_mixers(...)`` returns the same model as an explicit block list.

    Defaults: the paper uses a few full layers (e.g. 4 of 24 for 1.3B) and studies their placement;
    counts, placement and window were not retrieved (METHODS.md C7 [mem]): here one full layer,
    the top one, and a 256-token window; the MQAR preset uses a 16-token window.
    """

    paper = ("Efficient Long-Range Transformers: You Need to Attend More, but Not Necessarily at Every Layer "
             "(MASFormer, arXiv 2310.12442)")
    kind = "helper"
    presets = {"mqar": {"window": 16}, "listops": {"window": 32}}

    def __init__(self, dim: int, heads: int, causal: bool = True, layer_index: int = 0, n_layers: int = 1,
                 full_layers: tuple = (-1,), inner: str = "window", inner_config: Optional[dict] = None,
                 window: int = 256, block_size: int = 64, bias: bool = False):
        super().__init__()
        check_int("n_layers", n_layers)
        check_int("layer_index", layer_index, 0)
        if layer_index >= n_layers:
            raise ValueError(f"layer_index: expected < n_layers={n_layers}, got {layer_index}")
        if isinstance(full_layers, int) or not isinstance(full_layers, (tuple, list)) or any(
                isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers for i in full_layers):
            raise ValueError(f"full_layers: expected a tuple of layer indices in [-{n_layers}, {n_layers}), "
                             f"got {full_layers!r}")
        if inner_config is not None and not isinstance(inner_config, dict):
            raise ValueError(f"inner_config: expected a dict or None, got {inner_config!r}")
        if not isinstance(inner, str) or inner == "masformer":
            raise ValueError(f"inner: expected 'window' or another registered layer's name, got {inner!r}")
        self.window = check_int("window", window)
        self.block_size = check_pow2("block_size", block_size)
        self.full = layer_index in _full_set(full_layers, n_layers)
        self.inner_layer = None
        self._pat: dict = {}
        if not self.full and inner != "window":
            self._init_qkv(dim, heads, causal, bias)  # checks dim / heads / causal
            del self.qkv_proj, self.out_proj
            cfg = dict(inner_config or {})
            if "causal" in hyper_parameters(inner):
                cfg.setdefault("causal", causal)
            self.inner_layer = get_layer(inner, dim, heads, **cfg)
        else:
            if inner_config:
                raise ValueError("inner_config: expected None with inner='window'")
            self._init_qkv(dim, heads, causal, bias)

    def _pattern(self, T: int, device):
        key = (T, str(device))
        if key not in self._pat:
            self._pat = {key: patterns.sliding_window(T, self.window, causal=self.causal, block_q=self.block_size,
                                                      device=device)}
        return self._pat[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full attention (full layers) or the sparse span of ``x [B, T, dim]``."""
        if self.inner_layer is not None:
            return self.inner_layer(x)
        self.check_x(x)
        q, k, v = self.split(x)
        pat = None if self.full else self._pattern(x.shape[1], x.device)
        return self.merge(attend(q, k, v, pat, causal=self.causal))

    def extra_loss(self):
        """The inner layer's auxiliary loss (None for full / window blocks)."""
        return self.inner_layer.extra_loss() if self.inner_layer is not None else None

    def cost(self, T: int) -> dict:
        """Dense cost in full layers; the window pattern's or the inner layer's cost elsewhere."""
        if self.inner_layer is not None:
            return self.inner_layer.cost(T)
        if self.full:
            return super().cost(T)
        return pattern_cost(self._pattern(T, "cpu"), self.heads, self.head_dim)
