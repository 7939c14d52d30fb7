"""prefill_settings: the settings of the prefill quality driver, one per (method, target density, length).

Every fact about a method comes from the method's class (``sparsattn.methods.base``'s presets), so a
registered method reaches the driver without an edit here:

* ``fixed_settings(T, ctx)``: configurations evaluated as they are (dense; a shipped calibration that
  fixes the budget), density measured, not chosen;
* ``density_knob(T, target, ctx)``: one knob searched (``search_knob``) so that the *measured* density
  of the patterns (``BlockPattern.density``, mean over layers) is closest to the target, on a captured
  calibration prompt; a knob with a ``proxy`` is searched on the proxy's density and the method's own
  density is measured once;
* calibrations: ``ctx.calibrations`` holds the shipped ones (``shipped_calibrations``: the file of every
  calibrated method's ``sparsattn.calibrate`` module in the bundled model's folder) and ``ctx.work_dir``
  the run's output folder for derived files; a calibration re-fitted at each target density
  (``fit_at_density``: the calibrate modules that define one) is one more setting per target.

The default method list (``default_prefill_methods``) is every registered prefill method declaring
``density_knob`` or ``fixed_settings``, without a ``slow`` note.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..methods.base import DensityKnob, PresetContext, declares, list_methods, method_class
from ..methods.razor import razor_subset  # noqa: F401  (public name of the driver; the rule lives on the method)
from ._harness import timed_logger
from .prefill_capture import Captured, measure_density
from .prefill_report import _f

__all__ = ["BLOCK", "SearchResult", "search_knob", "Family", "knob_family", "Setting", "default_prefill_methods",
           "shipped_calibrations", "resolve_settings", "density_fitters", "fit_at_densities", "razor_subset",
           "method_spec", "check_method_specs"]

BLOCK = 64  # the key block of block-granular presets

_log = timed_logger("prefill_quality")


# ----------------------------------------------------------------------------------------------
# density search
# ----------------------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """SearchResult: the knob value closest to the target, its density and every evaluation ``(x, density)``."""
    x: float
    density: float
    evals: list
    met: bool


def search_knob(measure: Callable[[float], float], target: float, *, lo: float, hi: float, guess: float,
                integer: bool, increasing: bool = True, tol: float = 0.1, max_evals: int = 10) -> SearchResult:
    """search_knob: find ``x`` in ``[lo, hi]`` whose ``measure(x)`` (a density, monotone in ``x``) is closest to ``target``.

    Proportional steps (density taken as proportional to ``x``, or to ``1/x`` when ``increasing`` is
    False) until the target is bracketed, then geometric bisection; stops at ``|d - target| <=
    tol * target``, at ``max_evals`` evaluations, or when an integer bracket is one apart.
    Raises:
        ValueError: bad target / bounds.
    """
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ValueError(f"target: expected a density in (0, 1], got {target!r}")
    if not (0 < lo <= hi):
        raise ValueError(f"lo, hi: expected 0 < lo <= hi, got {lo!r}, {hi!r}")
    cache: dict = {}
    order: list = []

    def snap(x: float):
        x = min(hi, max(lo, x))
        return int(round(x)) if integer else float(x)

    def ev(x):
        x = snap(x)
        if x not in cache:
            d = float(measure(x))
            if not math.isfinite(d):
                raise ValueError(f"measure: density at {x!r} is {d}")
            cache[x] = d
            order.append((x, d))
        return x, cache[x]

    def good(d):
        return abs(d - target) <= tol * target

    def need_larger(d):  # the target lies at larger x
        return (d < target) if increasing else (d > target)

    def done():
        best = min(cache.items(), key=lambda kv: (abs(kv[1] - target), kv[1]))
        return SearchResult(best[0], best[1], list(order), good(best[1]))

    x, d = ev(guess)
    a = b = None  # a: largest x known to need larger, b: smallest x known to need smaller
    while len(cache) < max_evals and not good(d):
        if need_larger(d):
            a = x if a is None else max(a, x)
        else:
            b = x if b is None else min(b, x)
        if a is not None and b is not None:
            if (integer and b - a <= 1) or (not integer and b <= a * 1.005):
                break
            nx = math.sqrt(a * b)
            if integer:
                nx = min(max(int(round(nx)), a + 1), b - 1)
        else:
            ratio = target / max(d, 1e-12)
            ratio = ratio if increasing else 1.0 / ratio
            ratio = min(8.0, max(1.0 / 8.0, ratio))
            if need_larger(d) and ratio < 1.25:
                ratio = 1.25
            if not need_larger(d) and ratio > 0.8:
                ratio = 0.8
            nx = x * ratio
            if integer:
                nx = int(round(nx))
                if nx == x:
                    nx = x + 1 if need_larger(d) else x - 1
        nx = snap(nx)
        if nx in cache:  # at a bound, or no integer left between
            break
        x, d = ev(nx)
    return done()


def _method_of_calibration(stem: str) -> Optional[str]:
    """The calibrated method whose shipped calibration file or folder is named ``stem`` (None: none)."""
    from ..calibrate import calibrated_methods, calibrator

    for name in calibrated_methods():
        try:
            out = getattr(calibrator(name), "OUT", None)
        except ImportError:
            continue
        if out and Path(out).stem == stem:
            return name
    return None


Family = DensityKnob  # the public name of a method's searched family (methods.base.DensityKnob)


def knob_family(method: str, T: int, target: float, *, n_layers: int = 8, n_heads: int = 8,
                calibrations: Optional[dict] = None, work_dir: Optional[str] = None, **named) -> Optional[Family]:
    """knob_family: the searched family of ``method`` at length ``T`` and density ``target`` (its
    ``density_knob`` preset; None for methods that are not searched).

    ``calibrations``: method name -> calibration path handed to the preset (``PresetContext``). Older
    keyword arguments name a calibration by ``<method>_path`` or by the stem of the method's shipped
    file (``sparsattn.calibrate.<method>.OUT``, e.g. ``seer_gate``); they are read as calibrations too.
    """
    cals = dict(calibrations or {})
    for key, val in named.items():  # older call sites: razor_path=..., seer_gate=...
        name = key[: -len("_path")] if key.endswith("_path") else _method_of_calibration(key)
        if name is None:
            raise ValueError(f"{key}: unknown argument of knob_family (expected calibrations={{method: path}})")
        cals.setdefault(name, val)
    ctx = PresetContext(n_layers=n_layers, n_heads=n_heads, block_size=BLOCK, calibrations=cals, work_dir=work_dir)
    return method_class(method).density_knob(T, target, ctx)


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------

@dataclass
class Setting:
    """Setting: one method configuration at one length, with its measured calibration density."""
    method: str
    target: Optional[float]            # None: budget fixed by a calibration
    length: int
    label: str
    config: dict
    density_cal: float = float("nan")
    target_met: Optional[bool] = None
    evals: int = 0
    note: str = ""
    error: str = ""
    seconds: float = 0.0
    alias: str = ""                    # target_name of a second fixed setting that would share one

    @property
    def key(self) -> tuple:
        return (self.method, self.target_name)

    @property
    def target_name(self) -> str:
        if self.alias:
            return self.alias
        if self.target is None:
            return "calibrated"
        return "1.0" if self.target >= 1 else f"{self.target:g}"

    def build(self):
        """build: the method instance of this setting."""
        from ..methods import get_method

        return get_method(method_spec(self.method)[0], **self.config)

    def row(self) -> dict:
        """row: the ``settings.csv`` row (paths shortened to their file names)."""
        return {"method": self.method, "target": self.target_name, "length": self.length, "setting": self.label,
                "density_cal": _f(self.density_cal), "target_met": self.target_met, "evals": self.evals,
                "seconds": round(self.seconds, 2), "config": json.dumps(_short_paths(self.config), sort_keys=True),
                "note": self.note, "error": self.error}


def method_spec(spec: str) -> tuple[str, str]:
    """method_spec: ``"name"`` -> ``(name, "")``, ``"name:variant"`` -> ``(name, variant)`` (a searched family
    of the method's ``density_variants`` preset, e.g. ``seer_attention:threshold``)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"methods: expected a method name, got {spec!r}")
    base, _, variant = spec.partition(":")
    return base, variant


def check_method_specs(specs: Sequence[str], T: int = 4096) -> None:
    """check_method_specs: ValueError naming the bad entries unless every spec is a registered prefill
    method or ``name:variant`` with ``variant`` among the method's ``density_variants``."""
    valid = set(list_methods("prefill"))
    bad = [m for m in specs if method_spec(m)[0] not in valid]
    if bad:
        raise ValueError(f"methods: {bad} are not registered prefill methods; valid: {sorted(valid)}")
    for m in specs:
        base, variant = method_spec(m)
        if variant:
            cls = method_class(base)
            try:  # the variants' names (a preset that needs a real calibration file is not checked here)
                names = sorted(cls.density_variants(T, 0.1, PresetContext(calibrations={base: "-"})))
            except (ValueError, OSError):
                continue
            if variant not in names:
                raise ValueError(f"methods: {m!r}: {base} declares the density variants {names}, not {variant!r}")


def _over_label(over: dict) -> str:
    return "".join(f" +{k}={v}" for k, v in sorted(over.items()))


def _over_note(over: dict) -> str:
    return "set by --method-config: " + json.dumps(over, sort_keys=True, default=str)


def _config_key(s: "Setting") -> tuple:
    return (s.method, json.dumps(s.config, sort_keys=True, default=str))


def _short_paths(cfg: dict) -> dict:
    return {k: (os.path.basename(v) if isinstance(v, str) and k.endswith("path") else v) for k, v in cfg.items()}


def _calibration_dir() -> Path:
    from ..calibrate import shipped_dir

    return Path(shipped_dir())


def default_prefill_methods() -> list[str]:
    """default_prefill_methods: the registered prefill methods that declare ``density_knob`` or
    ``fixed_settings`` and have no ``slow`` note (the driver's default list)."""
    out = []
    for name in list_methods("prefill"):
        cls = method_class(name)
        if (declares(cls, "density_knob") or declares(cls, "fixed_settings")) and not cls.slow:
            out.append(name)
    return out


def shipped_calibrations(folder=None) -> dict:
    """shipped_calibrations: ``{method: path}`` of the calibration files present in ``folder`` (default: the
    bundled model's ``sparsattn.calibrate.shipped_dir()``), each calibrated method's file named by its
    ``sparsattn.calibrate.<method>.OUT``."""
    from ..calibrate import calibrated_methods, calibrator

    folder = Path(folder) if folder is not None else _calibration_dir()
    out = {}
    for name in calibrated_methods():
        try:
            mod = calibrator(name)
        except ImportError:  # a calibrated method without a model-level calibrator module
            continue
        p = folder / getattr(mod, "OUT", "")
        if getattr(mod, "OUT", None) and p.exists():
            out[name] = str(p)
    return out


def density_fitters(methods: Sequence[str]) -> dict:
    """density_fitters: ``{method: fit}`` for the methods among ``methods`` whose ``sparsattn.calibrate``
    module defines ``fit_at_density(model, tokenizer, density, out, *, lengths) -> note`` (a calibration
    re-fitted at a target density)."""
    from ..calibrate import calibrated_methods, calibrator

    cal = set(calibrated_methods())
    out = {}
    for name in methods:
        if name in cal:
            try:
                fit = getattr(calibrator(name), "fit_at_density", None)
            except ImportError:
                continue
            if fit is not None:
                out[name] = fit
    return out


def fit_at_densities(model, tok, methods: Sequence[str], densities: Sequence[float], out_dir: Path,
                     lengths=(4096, 8192)) -> dict:
    """fit_at_densities: ``{method: {density: (path or None, note)}}``: every method of ``density_fitters``
    re-fitted at each target density on prompts of ``lengths``, written to
    ``out_dir/calibration/<method>_b<density>.json`` (a failure is recorded in the note, path None)."""
    fitted: dict = {}
    for name, fit in density_fitters(methods).items():
        plans = fitted.setdefault(name, {})
        for d in densities:
            t0 = time.time()
            path = Path(out_dir) / "calibration" / f"{name}_b{d:g}.json"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    note = fit(model, tok, float(d), str(path), lengths=tuple(lengths))
                plans[float(d)] = (path, f"{note}, {time.time() - t0:.0f}s")
            except Exception as e:  # noqa: BLE001 - recorded in the setting, the others go on
                plans[float(d)] = (None, f"{name} fit failed: {type(e).__name__}: {e}"[:300])
            _log(f"{name} fit at density {d:g}: {plans[float(d)][1]}")
        for p in model.parameters():  # a fit may freeze or unfreeze parameters; nothing here trains
            p.requires_grad_(False)
    return fitted


def resolve_settings(methods: Sequence[str], densities: Sequence[float], T: int, cap: Captured, *,
                     n_layers: int, n_heads: int, out_dir: Path, fitted: Optional[dict] = None,
                     calibrations: Optional[dict] = None, tol: float = 0.1, max_evals: int = 10,
                     overrides: Optional[dict] = None) -> list[Setting]:
    """resolve_settings: the settings of every method at length ``T`` (density search on ``cap``).

    Args:
        fitted: ``{method: {density: (path or None, note)}}`` calibrations fitted at each target
            (``fit_at_densities``), one more setting each.
        calibrations: ``{method: path}`` handed to the presets (default ``shipped_calibrations()``).
        overrides: ``{method: {hyper-parameter: value}}`` set on every configuration of that method
            (fixed and searched, before its density is measured; ``--method-config``); the label
            and note say so.
    Errors of one method are recorded in its Setting (``error``) and do not stop the others.
    """
    ctx = PresetContext(n_layers=n_layers, n_heads=n_heads, block_size=BLOCK, work_dir=str(out_dir),
                        calibrations=shipped_calibrations() if calibrations is None else dict(calibrations))
    memo: dict = {}
    overrides = dict(overrides or {})
    for name, over in overrides.items():
        if not isinstance(over, dict):
            raise ValueError(f"overrides[{name!r}]: expected a dict of hyper-parameters, got {over!r}")

    def dens(name: str, cfg: dict) -> float:  # identical configurations are measured once
        from ..methods import get_method

        key = (name, json.dumps(cfg, sort_keys=True, default=str))
        if key not in memo:
            memo[key] = measure_density(get_method(name, **cfg), cap)[0]
        return memo[key]

    out: list[Setting] = []
    for name in methods:
        base, variant = method_spec(name)
        cls = method_class(base)
        fixed: list[Setting] = []
        try:
            fixed = [] if variant else [Setting(name, f.target, T, f.label, dict(f.config), note=f.note)
                                        for f in cls.fixed_settings(T, ctx)]
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            fixed = [Setting(name, None, T, "fixed", {}, error=f"{type(e).__name__}: {e}"[:300])]
        for d, (path, note) in sorted((fitted or {}).get(name, {}).items()):
            if path is None:
                fixed.append(Setting(name, d, T, f"fit b{d:g}", {}, error=note))
            else:
                fixed.append(Setting(name, d, T, f"fit b{d:g}", {"path": str(path)}, note=note))
        names = set()
        for s in fixed:  # several fixed settings of one target (e.g. a file with plans of two budgets)
            if s.target_name in names:
                s.alias = s.label
            names.add(s.target_name)
        over = overrides.get(name, overrides.get(base)) or {}
        for s in fixed:
            t0 = time.time()
            if over and not s.error:
                s.config.update(over)
                s.label, s.note = s.label + _over_label(over), (s.note + "; " if s.note else "") + _over_note(over)
            if not s.error:
                try:
                    s.density_cal = dens(base, s.config)
                    s.evals = 1
                    if s.target is not None:
                        s.target_met = abs(s.density_cal - s.target) <= tol * s.target
                except Exception as e:  # recorded, the others still run
                    s.error = f"{type(e).__name__}: {e}"[:300]
            s.seconds = time.time() - t0
            _log(f"T={T} {s.method:15s} {s.target_name:>10s} {s.label:28s} density {_f(s.density_cal)}"
                 + (f"  ERROR {s.error}" if s.error else ""))
            out.append(s)
        if fixed and not declares(cls, "density_knob") and not variant:
            continue
        for d in densities:
            t0 = time.time()
            s = Setting(name, float(d), T, "", {})
            try:
                fam = cls.density_variants(T, float(d), ctx).get(variant) if variant else \
                    cls.density_knob(T, float(d), ctx)
                if fam is None:
                    raise ValueError(f"method: no density family for {name!r}")
                on = fam.proxy or fam
                pover = over if on is fam else {}
                res = search_knob(lambda x: dens(on.method, {**on.config(x), **pover}), d, lo=on.lo, hi=on.hi,
                                  guess=on.guess, integer=on.integer, increasing=on.increasing, tol=tol,
                                  max_evals=max_evals)
                cfg = {**fam.config(res.x), **over}
                if fam.proxy is None:
                    density, met, evals = res.density, res.met, len(res.evals)
                else:  # searched on the proxy: the method's own density, measured once
                    density = dens(base, cfg)
                    met, evals = abs(density - d) <= tol * d, 1
                s = Setting(name, float(d), T, fam.label(res.x) + _over_label(over), cfg, density, met, evals,
                            note=(fam.note or f"knob {fam.knob}={res.x:g}") + ("; " + _over_note(over) if over else ""))
            except Exception as e:  # recorded, the others still run
                s.error = f"{type(e).__name__}: {e}"[:300]
            s.seconds = time.time() - t0
            _log(f"T={T} {s.method:15s} {s.target_name:>10s} {s.label:28s} density {_f(s.density_cal)} "
                 f"({s.evals} evals{'' if s.target_met in (None, True) else ', target not met'})"
                 + (f"  ERROR {s.error}" if s.error else ""))
            out.append(s)
    return out
