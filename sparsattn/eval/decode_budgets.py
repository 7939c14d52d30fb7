"""decode_budgets: what the decode quality driver asks each decode method, all from the method's presets.

* ``budget_config(budget_tokens, ctx)`` (``sparsattn.methods.base``): the hyper-parameters for a token
  budget per KV head (tokens read on the layers the method sparsifies; each method's docstring
  states its rule); ``budget_mapped()`` lists the methods that declare one;
* ``slow``: a note that keeps the method out of the default grid (``slow_methods()``);
* ``calibrate_from_qk(qs, ks, config)``: entries fitted from captured q/k (e.g. outlier channels),
  captured here on one held-out passkey prompt (``calibrate_from_prompt``; ``calibrating_methods``).

``default_decode_methods()``: every registered decode method with a budget mapping and no ``slow`` note.
Budgets on the command line (``parse_budget``): token counts, fractions of the length, or ``full``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..methods.base import PresetContext, declares, list_methods, method_class
from .tasks import encode_ids, passkey

__all__ = ["Budget", "parse_budget", "budget_config", "budget_mapped", "slow_methods", "default_decode_methods",
           "calibrating_methods", "calibrate_from_prompt", "CALIBRATION_SEED"]

#: the seed of the calibration prompt (methods calibrated from q/k); evaluated samples use seed + i < this
CALIBRATION_SEED = 1_000_003


@dataclass(frozen=True)
class Budget:
    """Budget: one entry of ``--budgets``: ``kind`` "tokens" | "fraction" | "full", ``value``, ``label``."""

    kind: str
    value: float
    label: str

    def tokens(self, length: int) -> int:
        """Tokens per KV head at context length ``length`` (full: twice the length, i.e. every token)."""
        if self.kind == "tokens":
            return int(self.value)
        if self.kind == "fraction":
            return max(1, math.ceil(self.value * length))
        return 2 * int(length)


def parse_budget(s: str) -> Budget:
    """parse_budget: ``"64"`` (tokens), ``"0.02"`` (fraction of the length, in (0, 1]) or ``"full"``.

    Raises:
        ValueError: anything else (names ``--budgets`` and the expected forms).
    """
    t = str(s).strip().lower()
    if t == "full":
        return Budget("full", 0.0, "full")
    try:
        if "." in t or "e" in t:
            v = float(t)
            if not (0 < v <= 1) or not math.isfinite(v):
                raise ValueError
            return Budget("fraction", v, t)
        v = int(t)
        if v < 1:
            raise ValueError
        return Budget("tokens", v, str(v))
    except ValueError:
        raise ValueError(f"--budgets: expected token counts >= 1 (64), fractions in (0, 1] (0.02) or 'full', "
                         f"got {s!r}") from None


def budget_config(name: str, budget_tokens: int, *, n_layers: int, group_size: int) -> dict:
    """budget_config: the hyper-parameters of decode method ``name`` for ``budget_tokens`` tokens per KV head.

    See the module docstring for the mapping. ``n_layers`` scales TidalDecode's re-selection layer;
    ``group_size`` (query heads per KV head) splits RetrievalAttention's retrieval budget.
    Raises:
        ValueError: a budget < 1, bad model sizes, or a decode method without a mapping here.
    """
    B = int(budget_tokens)
    if B < 1:
        raise ValueError(f"budget_tokens: expected an int >= 1, got {budget_tokens!r}")
    if n_layers < 1 or group_size < 1:
        raise ValueError(f"n_layers/group_size: expected ints >= 1, got {n_layers}, {group_size}")
    cfg = method_class(name).budget_config(B, PresetContext(n_layers=n_layers, group_size=group_size))
    if cfg is None:
        raise ValueError(f"method: no budget mapping for decode method {name!r} (known: {', '.join(budget_mapped())}); "
                         f"declare a budget_config preset on its class (sparsattn.methods.base.Method.budget_config)")
    return cfg


def slow_methods() -> tuple:
    """slow_methods: the registered decode methods with a ``slow`` note (left out of the default grid)."""
    return tuple(n for n in list_methods("decode") if method_class(n).slow)


def budget_mapped() -> tuple:
    """budget_mapped: the registered decode methods that declare a ``budget_config`` preset."""
    return tuple(n for n in list_methods("decode") if declares(method_class(n), "budget_config"))


def default_decode_methods() -> list:
    """default_decode_methods: the registered decode methods with a budget mapping and no ``slow`` note
    (the driver's default grid)."""
    return [n for n in budget_mapped() if not method_class(n).slow]


def calibrating_methods(methods) -> list:
    """calibrating_methods: those of ``methods`` that declare a ``calibrate_from_qk`` preset (calibrated on
    a held-out prompt by the driver)."""
    return [n for n in methods if declares(method_class(n), "calibrate_from_qk")]


def calibrate_from_prompt(name: str, model, tokenizer, *, length: int, seed: int = CALIBRATION_SEED,
                          device=None, **config) -> dict:
    """calibrate_from_prompt: the configuration entries that decode method ``name`` fits from q/k
    (its ``calibrate_from_qk`` preset), captured on one held-out passkey prompt of ``length`` tokens
    (seed ``seed``, never an evaluated sample's); ``config`` = its hyper-parameters.

    Raises:
        ValueError: ``name`` declares no ``calibrate_from_qk`` preset.
    """
    from ..capture import capture_qkv

    cls = method_class(name)
    if not declares(cls, "calibrate_from_qk"):
        raise ValueError(f"name: {name!r} declares no calibrate_from_qk preset")
    s = passkey(tokenizer, length, 0.5, seed=seed)
    dev = device or next(model.parameters()).device
    ids = torch.tensor([encode_ids(tokenizer, s.prompt)], device=dev)
    cap = capture_qkv(model, ids)
    layers = sorted(cap)
    return cls.calibrate_from_qk([cap[l][0] for l in layers], [cap[l][1] for l in layers], config)


def calibrate_double_sparsity(model, tokenizer, *, length: int, seed: int = CALIBRATION_SEED,
                              device=None, group_factor: int = 8) -> dict:
    """calibrate_double_sparsity: Double Sparsity's outlier channels (Post-Training Sparse Attention with
    Double Sparsity, arXiv 2408.07092) from one held-out passkey prompt of ``length`` tokens (seed
    ``seed``, never an evaluated sample's): ``{layer: [[channel] per KV head]}``, ``D / group_factor``
    channels per KV head (``calibrate_from_prompt`` of its preset; kept for older code)."""
    from ..methods.double_sparsity import DoubleSparsity

    return calibrate_from_prompt(DoubleSparsity.name, model, tokenizer, length=length, seed=seed, device=device,
                                 group_factor=group_factor)["channels"]
