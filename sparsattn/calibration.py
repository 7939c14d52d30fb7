"""Calibration: save/load per-model calibration results (offline pattern search, head scores) as JSON.

A calibration file records the model shape it was fitted on, and loading it for another shape is
refused with the mismatching field named. Format::

    {"format": "sparsattn-calibration", "version": 1, "method": "<registered name>",
     "model_shape": {"num_layers": L, "num_heads": Hq, "num_kv_heads": Hkv, "head_dim": D},
     "config": {...hyper-parameters used while fitting...},
     "data": {...method-specific, JSON only...}}

JSON only (never pickle). Keys of JSON objects are strings: layers and heads are written as
decimal strings and the methods convert them back.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch

FORMAT = "sparsattn-calibration"
VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """ModelShape: the attention shape of a model a calibration belongs to."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model_shape.{name}: expected an int >= 1, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model_shape.num_kv_heads: expected a divisor of num_heads={self.num_heads}, "
                             f"got {self.num_kv_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        if not isinstance(d, dict):
            raise ValueError(f"model_shape: expected a dict, got {type(d).__name__}")
        missing = [n for n in ("num_layers", "num_heads", "num_kv_heads", "head_dim") if n not in d]
        if missing:
            raise ValueError(f"model_shape: missing field(s) {missing}")
        return cls(int(d["num_layers"]), int(d["num_heads"]), int(d["num_kv_heads"]), int(d["head_dim"]))

    @classmethod
    def from_captured(cls, captured: dict, num_layers: Optional[int] = None) -> "ModelShape":
        """Shape from captured ``{layer: (q, k[, v])}`` tensors (``num_layers`` default max layer + 1)."""
        if not isinstance(captured, dict) or not captured:
            raise ValueError("captured: expected a non-empty dict {layer: (q, k, ...)}")
        layers = sorted(int(x) for x in captured)
        q, k = captured[layers[0]][0], captured[layers[0]][1]
        L = layers[-1] + 1 if num_layers is None else num_layers
        return cls(L, int(q.shape[1]), int(k.shape[1]), int(q.shape[3]))

    def check_qk(self, q: torch.Tensor, k: torch.Tensor, layer: Optional[int], source: str = "calibration") -> None:
        """Refuse q/k (and layer) that do not fit this shape, naming the field."""
        got = {"num_heads": q.shape[1], "num_kv_heads": k.shape[1], "head_dim": q.shape[3]}
        for name, v in got.items():
            if getattr(self, name) != v:
                raise ValueError(f"{source}: model_shape.{name} is {getattr(self, name)} but the inputs have "
                                 f"{v}; the calibration belongs to another model (refit it for this one)")
        if layer is not None and not 0 <= int(layer) < self.num_layers:
            raise ValueError(f"ctx.layer: expected a layer in [0, {self.num_layers}) (model_shape.num_layers), got {layer}")


ShapeLike = Union[ModelShape, dict]


def _as_shape(s: ShapeLike) -> ModelShape:
    return s if isinstance(s, ModelShape) else ModelShape.from_dict(s)


def check_shape(recorded: ShapeLike, expected: ShapeLike, source: str = "calibration") -> None:
    """check_shape: raise ValueError naming the first field where ``recorded`` differs from ``expected``."""
    r, e = _as_shape(recorded), _as_shape(expected)
    for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(r, name) != getattr(e, name):
            raise ValueError(f"{source}: model_shape.{name} is {getattr(r, name)} in the calibration but "
                             f"{getattr(e, name)} in the model; refit the calibration for this model")


def _finite(obj: Any, where: str = "data") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where}: expected finite numbers, got {obj}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")


def save_calibration(path: Union[str, os.PathLike], method: str, model_shape: ShapeLike, data: dict,
                     config: Optional[dict] = None) -> str:
    """save_calibration: write a calibration JSON for ``method`` fitted on ``model_shape``; returns the path."""
    if not isinstance(method, str) or not method:
        raise ValueError(f"method: expected a non-empty method name, got {method!r}")
    if not isinstance(data, dict):
        raise ValueError(f"data: expected a dict, got {type(data).__name__}")
    _finite(data)
    doc = {"format": FORMAT, "version": VERSION, "method": method, "model_shape": _as_shape(model_shape).to_dict(),
           "config": dict(config or {}), "data": data}
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def load_calibration(path: Union[str, os.PathLike], method: Optional[str] = None,
                     expect_shape: Optional[ShapeLike] = None) -> tuple[ModelShape, dict, dict]:
    """load_calibration: read a calibration JSON -> ``(model_shape, data, config)``.

    Refuses (ValueError) a file of another format/version, of another ``method``, or recorded for
    a model shape other than ``expect_shape`` (naming the mismatching field).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: expected an existing calibration JSON file, got {path!r}")
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"path: {path!r} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"path: {path!r} is not a sparsattn calibration file (format {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"path: {path!r} has calibration version {doc.get('version')!r}; expected {VERSION}")
    if method is not None and doc.get("method") != method:
        raise ValueError(f"path: {path!r} holds a calibration for method {doc.get('method')!r}, expected {method!r}")
    shape = ModelShape.from_dict(doc.get("model_shape"))
    if expect_shape is not None:
        check_shape(shape, expect_shape, source=f"calibration {path!r}")
    data = doc.get("data")
    if not isinstance(data, dict):
        raise ValueError(f"path: {path!r} has no 'data' object")
    return shape, data, dict(doc.get("config") or {})
