"""Calibration: save/load per-model calibration results (offline pattern search, head scores, gates)
through one checked loader.

Every file a calibrated method reads (calibration JSON, MoA plans, Double Sparsity channels, the
SeerAttention gate's ``config.json`` / ``gate.safetensors``) goes through ``read_json`` /
``read_safetensors`` here, and every value inside it through a typed ``Field`` accessor. A missing,
binary, truncated or mistyped file therefore always raises ``ValueError`` naming the file and the
field path (``data.3.heads[2]``), never a raw ``JSONDecodeError`` / ``UnicodeDecodeError`` /
``KeyError`` / ``SafetensorError`` or an error from ``int()`` deep inside a method.

A calibration file records the model shape it was fitted on, and loading it for another shape is
refused with the mismatching field named. Format::

    {"format": "sparsattn-calibration", "version": 1, "method": "<registered name>",
     "model_shape": {"num_layers": L, "num_heads": Hq, "num_kv_heads": Hkv, "head_dim": D},
     "config": {...hyper-parameters used while fitting...},
     "data": {...method-specific, JSON only...}}

JSON only (never pickle). Keys of JSON objects are strings: layers and heads are written as
decimal strings and read back with ``Field.int_keys``.
"""
from __future__ import annotations

import json
import math
import operator
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

import torch

FORMAT = "sparsattn-calibration"
VERSION = 1

PathLike = Union[str, os.PathLike]
_MISSING = object()


def _show(v: Any) -> str:
    """A short description of a JSON value for error messages: its repr (cut) and its type."""
    r = repr(v)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{r} ({type(v).__name__})"


class Field:
    """Field: one value read from a file, with the file and the field path it came from.

    Accessors (``as_int``, ``as_float``, ``as_str``, ``as_list``, ``as_dict``, ``int_keys``,
    ``int_list``, ``float_list``, indexing) check the JSON type and range and raise ``ValueError``
    ``"<file>: field <path>: expected ..., got ..."`` otherwise. Dict keys are joined with ``.``
    and list positions written ``[i]``, e.g. ``data.3.heads[2]``.
    """

    __slots__ = ("value", "file", "path")

    def __init__(self, value: Any, file: str, path: str = ""):
        self.value, self.file, self.path = value, str(file), path

    def __repr__(self) -> str:
        return f"Field({self.file}: {self.path or '<top level>'} = {_show(self.value)})"

    # -- errors and navigation ------------------------------------------------------------------
    def where(self) -> str:
        """``"<file>: field <path>"`` (``<top level>`` for the document itself)."""
        return f"{self.file}: field {self.path or '<top level>'}"

    def error(self, expected: str, got: Any = _MISSING) -> ValueError:
        """A ValueError naming file and field: expected ``expected``, got the value (or ``got``)."""
        got = _show(self.value) if got is _MISSING else got
        return ValueError(f"{self.where()}: expected {expected}, got {got}")

    def _child(self, key: Union[str, int]) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else str(key)

    def __getitem__(self, key: Union[str, int]) -> "Field":
        if isinstance(key, int) and not isinstance(key, bool):
            items = self.as_list()
            if not -len(items) <= key < len(items):
                raise self.error(f"a list with an element [{key}]", f"{len(items)} elements")
            return items[key]
        d = self.as_dict()
        if key not in d:
            have = sorted(d)
            more = ", ..." if len(have) > 12 else ""
            raise ValueError(f"{self.file}: field {self._child(key)}: missing (the object has "
                             f"{', '.join(map(repr, have[:12])) or 'no fields'}{more})")
        return d[key]

    def get(self, key: str, default: Any = None) -> Any:
        """The child field ``key`` of an object, or ``default`` when absent (or JSON null)."""
        d = self.as_dict()
        return d[key] if key in d and d[key].value is not None else default

    def __contains__(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value

    # -- containers -----------------------------------------------------------------------------
    def as_dict(self) -> dict:
        """``{key: Field}`` of a JSON object (ValueError naming the field otherwise)."""
        if not isinstance(self.value, dict):
            raise self.error("a JSON object {...}")
        return {str(k): Field(v, self.file, self._child(str(k))) for k, v in self.value.items()}

    def as_list(self, length: Optional[int] = None, *, min_len: int = 0) -> list:
        """``[Field]`` of a JSON array, optionally of exactly ``length`` / at least ``min_len`` elements."""
        if not isinstance(self.value, list):
            raise self.error("a JSON list [...]" if length is None else f"a JSON list of {length} elements")
        if length is not None and len(self.value) != length:
            raise self.error(f"a list of {length} elements", f"{len(self.value)} elements")
        if len(self.value) < min_len:
            raise self.error(f"a list of at least {min_len} elements", f"{len(self.value)} elements")
        return [Field(v, self.file, self._child(i)) for i, v in enumerate(self.value)]

    def int_keys(self, lo: int = 0, hi: Optional[int] = None) -> dict:
        """``{int: Field}`` of an object whose keys are decimal integers in ``[lo, hi)`` (layers, heads)."""
        out = {}
        for k, f in self.as_dict().items():
            s = k.strip()
            ok = s.lstrip("-").isdigit() and s.isascii()
            n = int(s) if ok else None
            if n is None or n < lo or (hi is not None and n >= hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
                raise ValueError(f"{self.where()}: expected keys that are integers {rng}, got key {k!r}")
            if n in out:
                raise ValueError(f"{self.where()}: key {k!r} repeats integer key {n}")
            out[n] = f
        return out

    # -- scalars --------------------------------------------------------------------------------
    def as_int(self, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
        """An integer in ``[lo, hi]`` (JSON integer; an integral float such as ``3.0`` is accepted)."""
        v = self.value
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            v = int(v)
        rng = ("" if lo is None and hi is None else f" >= {lo}" if hi is None else
               f" <= {hi}" if lo is None else f" in [{lo}, {hi}]")
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"an integer{rng}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.error(f"an integer{rng}")
        return v

    def as_float(self, lo: Optional[float] = None, hi: Optional[float] = None, *, finite: bool = True,
                 lo_open: bool = False) -> float:
        """A number (JSON int or float) in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); finite unless ``finite=False``."""
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error("a number")
        v = float(v)
        if finite and not math.isfinite(v):
            raise self.error("a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise self.error(f"a number {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise self.error(f"a number <= {hi}")
        return v

    def as_str(self, choices: Optional[Sequence[str]] = None) -> str:
        """A string (one of ``choices`` when given)."""
        if not isinstance(self.value, str):
            raise self.error("a string" if choices is None else f"one of {list(choices)}")
        if choices is not None and self.value not in choices:
            raise self.error(f"one of {list(choices)}")
        return self.value

    def as_bool(self) -> bool:
        """A JSON true/false."""
        if not isinstance(self.value, bool):
            raise self.error("true or false")
        return self.value

    def int_list(self, lo: Optional[int] = None, hi: Optional[int] = None, length: Optional[int] = None) -> list:
        """A list of integers in ``[lo, hi]`` (each element checked with its position named)."""
        return [f.as_int(lo, hi) for f in self.as_list(length)]

    def float_list(self, length: Optional[int] = None, **kw) -> list:
        """A list of numbers (``as_float`` keywords apply to every element)."""
        return [f.as_float(**kw) for f in self.as_list(length)]

    def float_matrix(self, rows: int, cols: int, **kw) -> list:
        """A ``rows x cols`` list of lists of numbers."""
        return [r.float_list(cols, **kw) for r in self.as_list(rows)]

    def plain(self) -> Any:
        """The raw JSON value."""
        return self.value


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

def _existing_file(path: PathLike, arg: str, kind: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{arg}: expected a path to a {kind}, got {_show(path)}")
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ValueError(f"{arg}: {kind} {p!r} does not exist")
    if not os.path.isfile(p):
        raise ValueError(f"{arg}: {p!r} is not a file (expected a {kind})")
    return p


def read_json(path: PathLike, *, arg: str = "path", kind: str = "JSON file") -> Field:
    """read_json: a JSON file as a root ``Field``; every failure is a ValueError naming ``arg`` and the path.

    Refuses a missing path, a directory, a binary (non UTF-8) file, invalid or truncated JSON
    (with line and column) and nesting too deep to parse."""
    p = _existing_file(path, arg, kind)
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{arg}: cannot read {kind} {p!r} ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{arg}: {p!r} is not a {kind} (not UTF-8 text: byte {e.start} is "
                         f"{raw[e.start]:#04x}; a binary file?)") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; the file looks truncated" if e.pos >= len(text.rstrip()) else ""
        raise ValueError(f"{arg}: {p!r} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}{hint})") from None
    except RecursionError:
        raise ValueError(f"{arg}: {p!r} is nested too deeply to be a {kind}") from None
    return Field(doc, p)


def write_json(path: PathLike, doc: Any, *, indent: Optional[int] = 1) -> str:
    """write_json: write ``doc`` as JSON atomically (temporary file + replace); refuses NaN/inf; returns the path."""
    p = os.fspath(path)
    d = os.path.dirname(p)
    if d:
        os.makedirs(d, exist_ok=True)
    text = json.dumps(doc, indent=indent, sort_keys=True, allow_nan=False)
    tmp = p + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, p)
    return p


def read_safetensors(path: PathLike, *, arg: str = "path") -> dict:
    """read_safetensors: ``{name: tensor}`` of a safetensors file (CPU); a missing, truncated or
    corrupt file raises ValueError naming ``arg`` and the path (never a raw ``SafetensorError``)."""
    from safetensors.torch import load_file

    p = _existing_file(path, arg, "safetensors file")
    try:
        return load_file(p, device="cpu")
    except Exception as e:  # SafetensorError, OSError, ValueError from a corrupt header ...
        raise ValueError(f"{arg}: {p!r} is not a readable safetensors file ({type(e).__name__}: {e}; "
                         "truncated or not a safetensors file?)") from None


def tensor_field(tensors: dict, name: str, file: str, shape: Optional[tuple] = None, *,
                 floating: bool = True, finite: bool = True) -> torch.Tensor:
    """tensor_field: ``tensors[name]`` checked for presence, shape, a floating dtype and finite values;
    ValueError ``"<file>: tensor <name>: ..."`` otherwise."""
    if name not in tensors:
        have = sorted(tensors)
        raise ValueError(f"{file}: tensor {name}: missing (the file has {', '.join(have[:12]) or 'no tensors'}"
                         f"{', ...' if len(have) > 12 else ''})")
    t = tensors[name]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{file}: tensor {name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if floating and not t.dtype.is_floating_point:
        raise ValueError(f"{file}: tensor {name}: expected a floating dtype, got {t.dtype}")
    if finite and floating and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{file}: tensor {name}: expected finite values, got NaN or inf")
    return t


# ----------------------------------------------------------------------------------------------
# model shape
# ----------------------------------------------------------------------------------------------

_SHAPE_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class ModelShape:
    """ModelShape: the attention shape of a model a calibration belongs to."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        for name in _SHAPE_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model_shape.{name}: expected an int >= 1, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model_shape.num_kv_heads: expected a divisor of num_heads={self.num_heads}, "
                             f"got {self.num_kv_heads}")

    def to_dict(self) -> dict:
        """``{"num_layers": ..., "num_heads": ..., "num_kv_heads": ..., "head_dim": ...}``."""
        return asdict(self)

    @classmethod
    def from_field(cls, f: Field) -> "ModelShape":
        """The shape stored in a file's ``model_shape`` field (ValueError naming file and field)."""
        vals = [f[name].as_int(1) for name in _SHAPE_FIELDS]
        if vals[1] % vals[2]:
            raise f["num_kv_heads"].error(f"a divisor of num_heads={vals[1]}")
        return cls(*vals)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        """The shape from a dict with the four fields (ints >= 1)."""
        if isinstance(d, Field):
            return cls.from_field(d)
        if not isinstance(d, dict):
            raise ValueError(f"model_shape: expected a dict, got {type(d).__name__}")
        missing = [n for n in _SHAPE_FIELDS if n not in d]
        if missing:
            raise ValueError(f"model_shape: missing field(s) {missing}")
        vals = []
        for n in _SHAPE_FIELDS:
            v = d[n]
            try:  # ints and integer scalars (numpy, 0-d tensors); not floats, strings or bools
                vals.append(v if isinstance(v, bool) else operator.index(v))
            except TypeError:
                vals.append(v)  # refused by __post_init__ with the field named
        return cls(*vals)

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
    for name in _SHAPE_FIELDS:
        if getattr(r, name) != getattr(e, name):
            raise ValueError(f"{source}: model_shape.{name} is {getattr(r, name)} in the calibration but "
                             f"{getattr(e, name)} in the model; refit the calibration for this model")


# ----------------------------------------------------------------------------------------------
# calibration files
# ----------------------------------------------------------------------------------------------

def _finite(obj: Any, where: str = "data") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where}: expected finite numbers, got {obj}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")


def save_calibration(path: PathLike, method: str, model_shape: ShapeLike, data: dict,
                     config: Optional[dict] = None) -> str:
    """save_calibration: write a calibration JSON for ``method`` fitted on ``model_shape``; returns the path."""
    if not isinstance(method, str) or not method:
        raise ValueError(f"method: expected a non-empty method name, got {method!r}")
    if not isinstance(data, dict):
        raise ValueError(f"data: expected a dict, got {type(data).__name__}")
    _finite(data)
    doc = {"format": FORMAT, "version": VERSION, "method": method, "model_shape": _as_shape(model_shape).to_dict(),
           "config": dict(config or {}), "data": data}
    return write_json(path, doc)


@dataclass
class Calibration:
    """Calibration: a checked calibration file: ``shape`` (ModelShape), ``data`` and ``config`` as
    ``Field``s (typed accessors name file and field), ``path``."""

    path: str
    method: str
    shape: ModelShape
    data: Field
    config: Field


def read_calibration(path: PathLike, method: Optional[str] = None, expect_shape: Optional[ShapeLike] = None, *,
                     arg: str = "path") -> Calibration:
    """read_calibration: read and check a calibration JSON's envelope -> ``Calibration``.

    Refuses (ValueError naming the file and field) a missing / binary / truncated file, a file of
    another format or version, of another ``method``, recorded for a model shape other than
    ``expect_shape``, or without a ``data`` object. The method-specific ``data`` is returned as a
    ``Field`` for the method's typed reading."""
    root = read_json(path, arg=arg, kind="calibration JSON file")
    p = root.file
    if not isinstance(root.value, dict) or root.value.get("format") != FORMAT:
        raise ValueError(f"{arg}: {p!r} is not a sparsattn calibration file (format {FORMAT!r}; "
                         f"got {_show(root.value.get('format') if isinstance(root.value, dict) else root.value)})")
    version = root["version"]
    if version.as_int() != VERSION:
        raise version.error(f"calibration version {VERSION} (this file was written by another sparsattn version)")
    m = root["method"].as_str()
    if method is not None and m != method:
        raise ValueError(f"{arg}: {p!r} holds a calibration for method {m!r}, expected {method!r}")
    shape = ModelShape.from_field(root["model_shape"])
    if expect_shape is not None:
        check_shape(shape, expect_shape, source=f"calibration {p!r}")
    data = root["data"]
    data.as_dict()
    config = root.get("config") or Field({}, p, "config")
    config.as_dict()
    return Calibration(p, m, shape, data, config)


def load_calibration(path: PathLike, method: Optional[str] = None,
                     expect_shape: Optional[ShapeLike] = None) -> tuple:
    """load_calibration: read a calibration JSON -> ``(model_shape, data, config)`` as plain values
    (the envelope checked as ``read_calibration``; the method-specific data is not)."""
    cal = read_calibration(path, method, expect_shape)
    return cal.shape, cal.data.plain(), dict(cal.config.plain())


__all__ = ["Field", "read_json", "write_json", "read_safetensors", "tensor_field", "ModelShape", "check_shape",
           "save_calibration", "Calibration", "read_calibration", "load_calibration", "FORMAT", "VERSION"]
