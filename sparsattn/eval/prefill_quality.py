"""prefill_quality: sparse-prefill quality of every prefill method on the bundled model, at matched densities.

What is measured (issue 4's quality targets: "at <= 10% density, passkey accuracy equal to dense and
attention recall >= 0.9 on the bundled model"):

1. **Settings at a target density.** For each prefill method and each target density (5%, 10% by
   default) and each context length, one hyper-parameter ("knob") of the method is searched so
   that the *measured* density of the patterns it returns (``BlockPattern.density``: kept / causal
   (query, key) pairs, exact at token level, mean over the model's layers and heads) is closest to
   the target, on a calibration passkey prompt of that length that is not scored. The other
   hyper-parameters follow fixed rules written in ``knob_family`` (e.g. A-shape's sink is a quarter
   of the row budget, at most 64). Calibrated methods whose budget the calibration fixes
   (``minference``, and ``moa`` with its shipped plan) get one setting, "calibrated", whose density
   is recorded, not chosen. ``razor`` keeps the top-n retrieval heads of the shipped calibration by
   induction score (n = target x heads / 2, at least 1; written as a derived calibration JSON in the
   output folder) and searches the other heads' window. ``masformer`` is layer 0 dense plus A-shape
   in the other layers; a dense layer alone is 1/L of the density, so below 1/L the A-shape layers
   get the A-shape setting of the same target and the row is marked ``target_met=False``.
   ``seer_attention`` uses the shipped gate in top-k mode (``nz_ratio``) with
   ``last_block_dense=False``: the repository's default makes the last two query blocks dense,
   which would let the answer rows read the whole context densely. ``moa`` can also be re-fitted
   at each target budget (``fit_moa`` on one 4K and one 8K prompt, sink and minimum span 32,
   ``--moa-fit``; on by default on CUDA).

2. **Passkey decided by the sparse prefill (teacher forcing).** Prefill-phase methods decode
   densely, so a generated passkey reads the needle through dense decode attention after its first
   token. Here the prompt and the gold answer (a space and 7 digits, one token each for the bundled
   tokenizer) run as *one* forward pass of the patched model (every layer sparse through
   ``sparsattn.integrations.hf.patched``), and a sample is correct iff the argmax prediction at every
   answer position equals the gold token: every digit is read through the sparse prefill attention.
   Also reported: the fraction of answer tokens predicted correctly and the first token alone. The
   reference is the unpatched model (transformers' SDPA). Needles at depths ``linspace(0, 1, n)``
   (RULER niah_single, Hsieh et al., arXiv 2404.06654; noise haystack; ``sparsattn.eval.tasks``).

3. **Fidelity on every layer** (``sparsattn.eval.fidelity.attention_fidelity``: attention recall,
   MInference arXiv 2407.02490; top-10 recall, Quest arXiv 2406.10774; relative output error;
   density) of the same settings on q/k/v captured from a held-out code prompt
   (``heldout_token_stream``) at one length (8192 by default), all query rows, methods selecting layer by layer in
   order as in a forward.

Outputs in ``--out``: ``settings.csv``, ``passkey.csv``, ``passkey_samples.csv``,
``fidelity_layers.csv``, ``summary.csv``, ``table.md`` (paste-ready for docs/methods.md),
``pareto.png`` (passkey accuracy and attention recall vs density), ``speedup.png`` (with
``--speed``: accuracy and recall vs the end-to-end speed-up of ``python -m sparsattn.bench.methods``),
``env.json``.

CLI: ``python -m sparsattn.eval.prefill_quality --out DIR [--device cuda] [--lengths 4096,8192,16384]
[--densities 0.05,0.1] [--n 10] [--methods a,b] [--speed methods_bench.csv] [--tiny]``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..bench.common import write_csv
from ..methods.base import DensityKnob, PresetContext, SelectHook, method_class
from .prefill_report import _f, plot_pareto, plot_speedup, read_speed, summarize, write_table
from .teacher_forced import score_teacher_forced, teacher_forced_ids, teacher_forced_predict

__all__ = [
    "PREFILL_METHODS", "Family", "Setting", "SearchResult", "search_knob", "knob_family", "teacher_forced_ids",
    "score_teacher_forced", "teacher_forced_predict", "capture_prompt", "measure_density", "fidelity_layers",
    "resolve_settings", "run", "replot", "write_table", "plot_pareto", "plot_speedup", "read_speed", "main",
]

#: the prefill methods evaluated by default (``sparsattn.list_methods("prefill")`` at the time of writing)
PREFILL_METHODS = ("dense", "a_shape", "vertical_slash", "block_sparse", "minference", "oracle_topk", "hip",
                   "longheads", "masformer", "s2_attention", "razor", "moa", "seer_attention")
DEFAULT_LENGTHS = (4096, 8192, 16384)
DEFAULT_DENSITIES = (0.05, 0.1)
CAL_SEED = 4242          # calibration passkey prompt (density search; never scored)
SAMPLE_SEED = 0          # scored passkey prompts
FID_SEED = 1000          # held-out code prompt of the fidelity measurement
ANSWER_MARGIN = 16       # prompts are built at length - ANSWER_MARGIN so that prompt + answer <= length
BLOCK = 64

_T0 = time.time()


def _log(msg: str) -> None:
    print(f"[prefill_quality {time.time() - _T0:6.1f}s] {msg}", flush=True)


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


Family = DensityKnob  # the public name of a method's searched family (methods.base.DensityKnob)


def knob_family(method: str, T: int, target: float, *, n_layers: int = 8, n_heads: int = 8,
                seer_gate: Optional[str] = None, razor_path: Optional[str] = None) -> Optional[Family]:
    """knob_family: the searched family of ``method`` at length ``T`` and density ``target``; None for
    methods that are not searched (their ``density_knob`` preset is None: dense, minference, moa,
    masformer are handled by ``resolve_settings``).

    The rules live on each method (``Method.density_knob``, b = target x (T + 1) / 2 is the mean kept
    keys per causal row); ``seer_gate``/``razor_path`` are the calibrations handed to them.
    """
    ctx = PresetContext(n_layers=n_layers, n_heads=n_heads, block_size=BLOCK,
                        calibrations={"seer_attention": seer_gate, "razor": razor_path})
    return method_class(method).density_knob(T, target, ctx)


def _razor_count(path: str) -> int:
    with open(path) as f:
        doc = json.load(f)
    return sum(len(d["retrieval_heads"]) for d in doc["data"].values())


def razor_subset(src: str, n_heads: int, out_path: str) -> str:
    """razor_subset: a copy of the razor calibration ``src`` keeping as retrieval heads the ``n_heads``
    (layer, head) pairs with the highest induction score (the scores stored in ``src``); written to
    ``out_path`` (same format, model shape and scores; ``config.derived_from`` records the source)."""
    with open(src) as f:
        doc = json.load(f)
    pairs = []
    for layer, d in doc["data"].items():
        ind = d.get("induction") or []
        if not ind:
            raise ValueError(f"{src}: layer {layer} has no induction scores to rank heads by")
        pairs += [(float(s), int(layer), h) for h, s in enumerate(ind)]
    if not 1 <= n_heads <= len(pairs):
        raise ValueError(f"n_heads: expected 1..{len(pairs)}, got {n_heads}")
    keep = sorted(pairs, reverse=True)[:n_heads]
    for layer, d in doc["data"].items():
        d["retrieval_heads"] = sorted(h for _, l, h in keep if str(l) == str(layer))
    doc["config"] = dict(doc.get("config") or {}, derived_from=os.path.basename(src),
                         rule=f"top {n_heads} heads by induction score")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(doc, indent=1) + "\n")
    return str(out_path)


# ----------------------------------------------------------------------------------------------
# captured prompts, select contexts, density and fidelity
# ----------------------------------------------------------------------------------------------

@dataclass
class Captured:
    """q/k/v (after RoPE) and pre-RoPE q/k of every attention layer for one prompt, plus softmax scales."""
    layers: dict      # layer -> (q, k, v, q_pre, k_pre)
    scales: dict      # layer -> float
    n_tokens: int


def capture_prompt(model, ids: torch.Tensor) -> Captured:
    """capture_prompt: ``Captured`` for ``ids [1, T]`` (``sparsattn.capture.capture_qkv`` + q_proj/k_proj hooks
    for the pre-RoPE tensors SeerAttention's gate reads)."""
    from ..capture import capture_qkv
    from ..integrations.hf import attention_modules

    mods = attention_modules(model)
    pre: dict = {l: {} for l in mods}
    hs = []
    for l, m in mods.items():
        hd = m.head_dim

        def hook(which, l=l, hd=hd):
            def fn(mod, args, out):
                B, T = out.shape[0], out.shape[1]
                pre[l][which] = out.detach().view(B, T, -1, hd).transpose(1, 2)
            return fn
        hs += [m.q_proj.register_forward_hook(hook("q")), m.k_proj.register_forward_hook(hook("k"))]
    try:
        cap = capture_qkv(model, ids)
    finally:
        for h in hs:
            h.remove()
    layers = {l: (*cap[l], pre[l].get("q"), pre[l].get("k")) for l in sorted(cap)}
    scales = {l: float(getattr(mods[l], "scaling", cap[l][0].shape[-1] ** -0.5)) for l in cap}
    return Captured(layers, scales, int(ids.shape[1]))


def _ctx(method, layer: int, q, k, v, qp, kp, scale: float, state: dict):
    """The SelectContext the HF integration builds at prefill (pre-RoPE q/k only for methods that ask)."""
    from ..methods.base import SelectContext

    extras = {"phase": "prefill", "q_lens": None, "kv_lens": None, "padding_side": "right", "sliding_window": None,
              "num_kv_groups": q.shape[1] // k.shape[1], "v": v}
    if getattr(method, "needs_pre_rope", False):
        extras["q_pre_rope"], extras["k_pre_rope"] = qp, kp
    return SelectContext(layer=layer, causal=True, scale=scale, q_offset=0, state=state, extras=extras)


def select_all(method, cap: Captured) -> dict:
    """``{layer: pattern}`` of ``method`` on every captured layer, in order, with one shared state."""
    state: dict = {}
    out = {}
    for l, (q, k, v, qp, kp) in cap.layers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[l] = method.select(q, k, _ctx(method, l, q, k, v, qp, kp, cap.scales[l], state))
    return out


def measure_density(method, cap: Captured) -> tuple[float, list[float]]:
    """measure_density: (mean over layers, per layer) of the exact pattern density of ``method`` on ``cap``."""
    pats = select_all(method, cap)
    per = [float(p.density) for p in pats.values()]
    return sum(per) / len(per), per


def _rows(p):
    """Row provider for attention_fidelity: rows [q0, q1) of pattern ``p`` (batch 0), never T x T at once."""
    bq = p.block_q

    def rows(q0: int, q1: int) -> torch.Tensor:
        qb0, qb1 = q0 // bq, -(-q1 // bq)
        m = p.mask_rows(0, qb0, qb1)
        return m[:, q0 - qb0 * bq: q1 - qb0 * bq][None]
    return rows


def fidelity_layers(method, cap: Captured, *, topk: int = 10) -> list[dict]:
    """fidelity_layers: one dict per layer (recall, topk_recall, rel_error, n_large_error, density, err_sq, ref_sq)
    of ``method``'s patterns against dense attention on ``cap`` (all query rows); ``method=None`` = dense."""
    from .fidelity import attention_fidelity

    out = []
    pats = select_all(method, cap) if method is not None else None
    for l, (q, k, v, _, _) in cap.layers.items():
        if pats is None:
            out.append({"layer": l, "recall": 1.0, "topk_recall": 1.0, "rel_error": 0.0, "n_large_error": 0,
                        "density": 1.0, "err_sq": 0.0, "ref_sq": 1.0})
            continue
        r = attention_fidelity(q.float(), k.float(), v.float(), _rows(pats[l]), causal=True, scale=cap.scales[l],
                               topk=topk)
        out.append({"layer": l, "recall": float(r.recall.mean()), "topk_recall": float(r.topk_recall.mean()),
                    "rel_error": math.sqrt(float(r.err_sq.sum()) / max(float(r.ref_sq.sum()), 1e-30)),
                    "n_large_error": int(r.n_large_error.sum()), "density": float(r.density.mean()),
                    "err_sq": float(r.err_sq.sum()), "ref_sq": float(r.ref_sq.sum())})
    return out


def _pool(layer_rows: list[dict]) -> dict:
    n = len(layer_rows)
    err = sum(r["err_sq"] for r in layer_rows)
    ref = sum(r["ref_sq"] for r in layer_rows)
    return {"recall": sum(r["recall"] for r in layer_rows) / n,
            "topk_recall": sum(r["topk_recall"] for r in layer_rows) / n,
            "rel_error": math.sqrt(err / ref) if ref > 0 else 0.0,
            "density": sum(r["density"] for r in layer_rows) / n,
            "min_layer_recall": min(r["recall"] for r in layer_rows)}


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

    @property
    def key(self) -> tuple:
        return (self.method, self.target_name)

    @property
    def target_name(self) -> str:
        if self.target is None:
            return "calibrated"
        return "1.0" if self.target >= 1 else f"{self.target:g}"

    def build(self):
        from ..methods import get_method

        return get_method(self.method, **self.config)

    def row(self) -> dict:
        return {"method": self.method, "target": self.target_name, "length": self.length, "setting": self.label,
                "density_cal": _f(self.density_cal), "target_met": self.target_met, "evals": self.evals,
                "seconds": round(self.seconds, 2), "config": json.dumps(_short_paths(self.config), sort_keys=True),
                "note": self.note, "error": self.error}


def _config_key(s: "Setting") -> tuple:
    return (s.method, json.dumps(s.config, sort_keys=True, default=str))


def _short_paths(cfg: dict) -> dict:
    return {k: (os.path.basename(v) if isinstance(v, str) and k.endswith("path") else v) for k, v in cfg.items()}


def _calibration_dir() -> Path:
    from ..models import BUNDLED_DIR

    return BUNDLED_DIR / "calibration"


def resolve_settings(methods: Sequence[str], densities: Sequence[float], T: int, cap: Captured, *,
                     n_layers: int, n_heads: int, out_dir: Path, moa_plans: Optional[dict] = None,
                     tol: float = 0.1, max_evals: int = 10) -> list[Setting]:
    """resolve_settings: the settings of every method at length ``T`` (density search on ``cap``).

    Errors of one method are recorded in its Setting (``error``) and do not stop the others.
    """
    cal = _calibration_dir()
    out: list[Setting] = []
    found: dict = {}
    for name in methods:
        fixed: list[Setting] = []
        if name == "dense":
            fixed = [Setting("dense", 1.0, T, "causal (kernel)", {"block_size": BLOCK})]
        elif name == "minference":
            fixed = [Setting("minference", None, T, "shipped plan", {"path": str(cal / "minference.json")})]
        elif name == "moa":
            fixed = [Setting("moa", None, T, "shipped plan (b0.5)", {"plan_path": str(cal / "moa.json")})]
            for d, (path, note) in sorted((moa_plans or {}).items()):
                if path is None:
                    fixed.append(Setting("moa", d, T, f"fit b{d:g}", {}, error=note))
                else:
                    fixed.append(Setting("moa", d, T, f"fit b{d:g}", {"plan_path": str(path)}, note=note))
        for s in fixed:
            t0 = time.time()
            if not s.error:
                try:
                    s.density_cal = measure_density(s.build(), cap)[0]
                    s.evals = 1
                    if s.target is not None:
                        s.target_met = abs(s.density_cal - s.target) <= tol * s.target
                except Exception as e:  # recorded, the others still run
                    s.error = f"{type(e).__name__}: {e}"[:300]
            s.seconds = time.time() - t0
            _log(f"T={T} {s.method:15s} {s.target_name:>10s} {s.label:28s} density {_f(s.density_cal)}"
                 + (f"  ERROR {s.error}" if s.error else ""))
            out.append(s)
        if fixed:
            continue
        for d in densities:
            t0 = time.time()
            s = Setting(name, float(d), T, "", {})
            try:
                if name == "masformer":
                    s = _masformer_setting(d, T, cap, found, n_layers, tol)
                else:
                    razor_path = None
                    if name == "razor":
                        n_ret = max(1, int(d * n_layers * n_heads / 2))
                        razor_path = razor_subset(str(cal / "razor.json"), n_ret,
                                                  str(out_dir / "calibration" / f"razor_top{n_ret}.json"))
                    fam = knob_family(name, T, d, n_layers=n_layers, n_heads=n_heads,
                                      seer_gate=str(cal / "seer_gate"), razor_path=razor_path)
                    if fam is None:
                        raise ValueError(f"method: no density family for {name!r}")
                    from ..methods import get_method

                    res = search_knob(lambda x: measure_density(get_method(name, **fam.config(x)), cap)[0], d,
                                      lo=fam.lo, hi=fam.hi, guess=fam.guess, integer=fam.integer,
                                      increasing=fam.increasing, tol=tol, max_evals=max_evals)
                    s = Setting(name, float(d), T, fam.label(res.x), fam.config(res.x), res.density, res.met,
                                len(res.evals), note=f"knob {fam.knob}={res.x:g}")
                    found[(name, d)] = s
            except Exception as e:  # recorded, the others still run
                s.error = f"{type(e).__name__}: {e}"[:300]
            s.seconds = time.time() - t0
            _log(f"T={T} {s.method:15s} {s.target_name:>10s} {s.label:28s} density {_f(s.density_cal)} "
                 f"({s.evals} evals{'' if s.target_met in (None, True) else ', target not met'})"
                 + (f"  ERROR {s.error}" if s.error else ""))
            out.append(s)
    return out


def _masformer_setting(d: float, T: int, cap: Captured, found: dict, n_layers: int, tol: float) -> Setting:
    """Layer 0 dense, A-shape elsewhere: the A-shape knob is searched for the overall density when one
    dense layer leaves room (d > 1/L), else the A-shape layers take A-shape's own setting for ``d``."""
    from ..methods import get_method

    inner_target = (n_layers * d - 1) / (n_layers - 1) if n_layers > 1 else d
    if inner_target >= 0.5 * d:
        fam = knob_family("a_shape", T, inner_target)

        def cfg(x):
            return dict(full_layers=[0], inner="a_shape", inner_config=fam.config(x), block_size=BLOCK)
        res = search_knob(lambda x: measure_density(get_method("masformer", **cfg(x)), cap)[0], d, lo=fam.lo,
                          hi=fam.hi, guess=fam.guess, integer=True, tol=tol)
        return Setting("masformer", d, T, "L0 dense + " + fam.label(res.x), cfg(res.x), res.density, res.met,
                       len(res.evals), note="inner a_shape searched for the overall density")
    inner = found.get(("a_shape", d))
    if inner is None:
        fam = knob_family("a_shape", T, d)
        r = search_knob(lambda x: measure_density(get_method("a_shape", **fam.config(x)), cap)[0], d, lo=fam.lo,
                        hi=fam.hi, guess=fam.guess, integer=True, tol=tol)
        icfg, ilabel = fam.config(r.x), fam.label(r.x)
    else:
        icfg, ilabel = inner.config, inner.label
    cfg = dict(full_layers=[0], inner="a_shape", inner_config=icfg, block_size=BLOCK)
    dens = measure_density(get_method("masformer", **cfg), cap)[0]
    return Setting("masformer", d, T, "L0 dense + " + ilabel, cfg, dens, abs(dens - d) <= tol * d, 1,
                   note=f"one dense layer of {n_layers} is already {1 / n_layers:.3f} density: the other layers "
                        f"use a_shape's setting for {d:g}")


def fit_moa_plans(model, tok, densities: Sequence[float], out_dir: Path, lengths=(4096, 8192), *, sink: int = 32,
                  min_span: int = 32) -> dict:
    """MoA plans fitted at each target budget (``fit_moa``, 1 sample per length, 16 answer tokens):
    ``{density: (plan path or None, note)}``. ``sink``/``min_span`` are 32 rather than ``fit_moa``'s 64
    so that a 5% budget is feasible at the profiled lengths (64 + 64 keys are 6.3% of a 4K context)."""
    from ..data import source_files
    from ..calibrate.moa import fit_moa

    plans = {}
    files = list(source_files("train"))  # scanned once for every budget
    for d in densities:
        t0 = time.time()
        path = out_dir / "calibration" / f"moa_b{d:g}.json"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = fit_moa(model, tok, lengths=tuple(lengths), budget=float(d), samples_per_length=1, answer_len=16,
                            sink=sink, min_span=min_span, alpha_step=256, seed=0, out_path=str(path), files=files,
                            log=None)
            info = m.plan.get("info", {})
            note = (f"fit_moa(lengths={list(lengths)}, budget={d:g}, sink={sink}, min_span={min_span}, "
                    f"1 sample/length, 16 answer tokens): "
                    f"feasible={info.get('feasible')}, density {['%.3f' % x for x in info.get('density', [])]}, "
                    f"{time.time() - t0:.0f}s")
            plans[float(d)] = (path, note)
        except Exception as e:
            plans[float(d)] = (None, f"fit_moa failed: {type(e).__name__}: {e}"[:300])
        _log(f"MoA fit at budget {d:g}: {plans[float(d)][1]}")
    for p in model.parameters():  # fit_moa freezes the parameters; nothing here trains
        p.requires_grad_(False)
    return plans


# ----------------------------------------------------------------------------------------------
# passkey run
# ----------------------------------------------------------------------------------------------

_STATIC_KEYS = {"a_shape": lambda l, m: (), "s2_attention": lambda l, m: (), "dense": lambda l, m: (),
                "razor": lambda l, m: (l,), "moa": lambda l, m: (l,),
                "masformer": lambda l, m: (l in m.full_layers,)}


class _Recorder(SelectHook):
    """Wraps ``method.select``: records every pattern's density and, for methods whose pattern depends only
    on (layer, lengths) (A-shape, S2, dense, RazorAttention, MoA, MASFormer over A-shape), reuses it."""

    def __init__(self, method):
        super().__init__(method)
        self.densities: list[float] = []
        name = getattr(method, "name", "")
        keyf = _STATIC_KEYS.get(name)
        if name == "masformer" and getattr(getattr(method, "_inner", None), "name", "") not in ("a_shape", "s2_attention"):
            keyf = None
        self.keyf = keyf
        self.cache: dict = {}

    def on_select(self, orig, q, k, ctx=None, *a, **kw):
        key = None
        if self.keyf is not None:
            key = (self.keyf(getattr(ctx, "layer", None), self.method), tuple(q.shape[:3]), tuple(k.shape[:3]), q.device)
            if key in self.cache:
                p, d = self.cache[key]
                self.densities.append(d)
                return p
        p = orig(q, k, ctx, *a, **kw)
        d = float(p.density)
        self.densities.append(d)
        if key is not None:
            self.cache[key] = (p, d)
        return p


@dataclass
class PromptSample:
    task: str
    depth: float
    prompt_ids: list
    answer_ids: list
    answer: str


def make_prompts(tok, task: str, T: int, n: int, seed: int) -> list[PromptSample]:
    """``n`` teacher-forcing samples of ``task`` (needle depths linspace(0, 1, n)) with prompt + answer <= T tokens."""
    from .tasks import make_samples

    kw = {"haystack": "noise"} if task == "passkey" else {}
    out = []
    for s in make_samples(task, tok, T - ANSWER_MARGIN, n, seed=seed, progress=False, **kw):
        p, a = teacher_forced_ids(tok, s.prompt, s.answers[0])
        out.append(PromptSample(task, float(s.meta.get("depth", float("nan"))), p, a, s.answers[0]))
    return out


def _first_content_token(tok, answer_ids: list) -> int:
    """Index of the first answer token that is not whitespace (the first digit; 0 if none can be decoded)."""
    for j, t in enumerate(answer_ids):
        try:
            if tok.decode([t]).strip():
                return j
        except Exception:  # noqa: BLE001 - a tokenizer without decode
            return 0
    return 0


def run_passkey(model, tok, setting: Optional[Setting], samples: list[PromptSample], *, device, backend) -> tuple[dict, list]:
    """Teacher-forced accuracy of one setting (None = the unpatched model) on ``samples``."""
    from ..integrations.hf import patched

    t0 = time.time()
    rows = []
    rec = None
    if setting is None:
        preds = [teacher_forced_predict(model, s.prompt_ids, s.answer_ids, device) for s in samples]
    else:
        m = setting.build()
        preds = []
        with _Recorder(m) as rec, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with patched(model, method=m, backend=backend):
                for s in samples:
                    preds.append(teacher_forced_predict(model, s.prompt_ids, s.answer_ids, device))
    for i, (s, p) in enumerate(zip(samples, preds)):
        sc = score_teacher_forced(p, s.answer_ids)
        j = _first_content_token(tok, s.answer_ids)
        rows.append({"sample": i, "depth": round(s.depth, 3), "n_tokens": len(s.prompt_ids) + len(s.answer_ids),
                     "correct": int(sc["correct"]), "token_acc": round(sc["token_acc"], 4),
                     "first_ok": int(sc["hits"][j]), "answer": s.answer,
                     "prediction": tok.decode(p.tolist()) if hasattr(tok, "decode") else " ".join(map(str, p.tolist()))})
    n = len(rows)
    dens = rec.densities if rec is not None else []
    dense = setting is None or setting.method == "dense"  # the integration skips select for plain dense
    agg = {"n": n, "acc": 100.0 * sum(r["correct"] for r in rows) / n,
           "token_acc": 100.0 * sum(r["token_acc"] for r in rows) / n,
           "first_token_acc": 100.0 * sum(r["first_ok"] for r in rows) / n,
           "density": (sum(dens) / len(dens)) if dens else (1.0 if dense else float("nan")),
           "by_depth": " ".join(str(r["correct"]) for r in rows),
           "seconds": time.time() - t0}
    return agg, rows


# ----------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------

def run(out_dir, *, device: str = "cpu", lengths: Sequence[int] = DEFAULT_LENGTHS,
        densities: Sequence[float] = DEFAULT_DENSITIES, n: int = 10, methods: Optional[Sequence[str]] = None,
        tasks: Sequence[str] = ("passkey",), fid_length: Optional[int] = None, speed_csv: Optional[str] = None,
        moa_fit: Optional[bool] = None, backend: Optional[str] = None, max_minutes: float = 0.0,
        model_path=None, tol: float = 0.1, fid_prompt: str = "code", tiny: bool = False) -> list[dict]:
    """run: the whole measurement (see the module docstring); returns the summary rows."""
    from ..evaluate import load_model
    from ..methods import list_methods

    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = sorted({int(x) for x in lengths})
    if not lengths or lengths[0] < 128:
        raise ValueError(f"lengths: expected token lengths >= 128, got {lengths}")
    densities = sorted({float(d) for d in densities})
    if not densities or not all(0 < d < 1 for d in densities):
        raise ValueError(f"densities: expected fractions in (0, 1), got {densities}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    valid = set(list_methods("prefill"))
    methods = list(PREFILL_METHODS if not methods else methods)
    bad = [m for m in methods if m not in valid]
    if bad:
        raise ValueError(f"methods: {bad} are not registered prefill methods; valid: {sorted(valid)}")
    for t in tasks:
        if t not in ("passkey", "multikey_needle"):
            raise ValueError(f"tasks: expected 'passkey' and/or 'multikey_needle', got {t!r}")
    if fid_prompt not in ("code", "passkey"):
        raise ValueError(f"fid_prompt: expected 'code' or 'passkey', got {fid_prompt!r}")
    fid_length = int(fid_length or (8192 if 8192 in lengths else lengths[-1]))
    if fid_length not in lengths:
        raise ValueError(f"fid_length: expected one of the lengths {lengths}, got {fid_length}")
    dev = torch.device(device)
    if backend is None:
        backend = "triton" if dev.type == "cuda" else "reference"
    if moa_fit is None:
        moa_fit = dev.type == "cuda" and not tiny
    speed = read_speed(speed_csv) if speed_csv else None
    deadline = t_start + 60 * max_minutes if max_minutes and max_minutes > 0 else None

    model, tok, mpath = load_model(model_path, device=device)
    cfg = model.config
    n_layers, n_heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos and lengths[-1] > max_pos:
        warnings.warn(f"lengths: {lengths[-1]} exceeds the model's max_position_embeddings {max_pos}")
    _log(f"model {mpath} on {device} ({next(model.parameters()).dtype}), backend {backend}; lengths {lengths}, "
         f"densities {densities}, n={n}, methods {methods}")

    env = {"environment": _environment(), "args": {
        "device": device, "lengths": lengths, "densities": densities, "n": n, "methods": methods, "tasks": list(tasks),
        "fid_length": fid_length, "fid_prompt": fid_prompt, "speed_csv": speed_csv, "moa_fit": moa_fit, "backend": backend,
        "max_minutes": max_minutes, "tol": tol, "tiny": tiny},
        "model": str(mpath), "model_dtype": str(next(model.parameters()).dtype),
        "protocol": {
            "density_search": f"knob searched per (method, target, length) on a calibration passkey prompt "
                              f"(make_samples('passkey', tok, L - {ANSWER_MARGIN}, 1, seed={CAL_SEED}), depth 0.5, "
                              "prompt + answer), density = BlockPattern.density mean over all layers; "
                              f"tolerance {tol:g} x target",
            "passkey": f"make_samples(task, tok, L - {ANSWER_MARGIN}, n, seed={SAMPLE_SEED}, haystack='noise'), "
                       "depths linspace(0, 1, n); one forward over prompt + ' ' + value under patched(model, method, "
                       "backend); correct iff argmax == gold at every answer token (space + 7 digits)",
            "fidelity": (f"heldout_token_stream(tok, {fid_length}, seed={FID_SEED})" if fid_prompt == "code" else
                         f"a passkey prompt (seed {FID_SEED}, depth 0.5) of {fid_length} tokens")
                        + "; all layers, all rows; attention_fidelity(topk=10); rel_error pooled over layers",
            "baseline": "sdpa_dense = the unpatched model (transformers SDPA)"},
        "timings": {}}
    moa_plans = None
    if moa_fit and "moa" in methods:
        t0 = time.time()
        fit_lengths = [x for x in (4096, 8192) if x <= lengths[-1]] or [lengths[-1]]
        moa_plans = fit_moa_plans(model, tok, densities, out_dir, fit_lengths)
        env["timings"]["moa_fit_s"] = round(time.time() - t0, 1)

    # 1. settings per length
    t0 = time.time()
    settings: dict[int, list[Setting]] = {}
    for L in lengths:
        cal = make_prompts(tok, "passkey", L, 1, CAL_SEED)[0]
        ids = torch.tensor([cal.prompt_ids + cal.answer_ids], device=dev)
        cap = capture_prompt(model, ids)
        settings[L] = resolve_settings(methods, densities, L, cap, n_layers=n_layers, n_heads=n_heads,
                                       out_dir=out_dir, moa_plans=moa_plans, tol=tol)
        del cap
        write_csv([s.row() for Ls in settings.values() for s in Ls], out_dir / "settings.csv")
    env["timings"]["settings_s"] = round(time.time() - t0, 1)
    all_settings = [s for Ls in settings.values() for s in Ls]

    # 2. fidelity at one length, every layer
    t0 = time.time()
    if fid_prompt == "code":
        from .perplexity import heldout_token_stream

        ids = heldout_token_stream(tok, fid_length, seed=FID_SEED)[None].to(dev)
    else:
        fp = make_prompts(tok, "passkey", fid_length, 1, FID_SEED)[0]
        ids = torch.tensor([fp.prompt_ids + fp.answer_ids], device=dev)
    cap = capture_prompt(model, ids)
    fid_rows: list[dict] = []
    fid: dict = {}
    done_fid: dict = {}  # identical configurations (e.g. a budget clamped for two targets) are measured once
    for s in settings[fid_length]:
        if s.error:
            continue
        t1 = time.time()
        try:
            ck = _config_key(s)
            if ck not in done_fid:
                done_fid[ck] = fidelity_layers(s.build(), cap)
            per = done_fid[ck]
        except Exception as e:
            s.error = f"fidelity: {type(e).__name__}: {e}"[:300]
            _log(f"fidelity {s.method} {s.target_name}: ERROR {s.error}")
            continue
        fid[s.key] = _pool(per)
        for r in per:
            fid_rows.append({"method": s.method, "target": s.target_name, "setting": s.label, "length": fid_length,
                             **{k: (_f(v, 5) if isinstance(v, float) else v) for k, v in r.items()
                                if k not in ("err_sq", "ref_sq")}})
        _log(f"fidelity T={fid_length} {s.method:15s} {s.target_name:>10s} density {fid[s.key]['density']:.4f} "
             f"recall {fid[s.key]['recall']:.4f} top10 {fid[s.key]['topk_recall']:.4f} "
             f"err {fid[s.key]['rel_error']:.4f} ({time.time() - t1:.1f}s)")
        write_csv(fid_rows, out_dir / "fidelity_layers.csv")
    del cap
    env["timings"]["fidelity_s"] = round(time.time() - t0, 1)

    # 3. teacher-forced passkey, length-major (a time limit cuts the longest lengths last)
    t0 = time.time()
    pk_rows: list[dict] = []
    sample_rows: list[dict] = []
    done_pk: dict = {}
    for L in lengths:
        for task in tasks:
            samples = make_prompts(tok, task, L, n, SAMPLE_SEED)
            jobs: list = [None] + [s for s in settings[L] if not s.error]
            for s in jobs:
                name, tgt, label = ("sdpa_dense", "reference", "unpatched") if s is None else \
                    (s.method, s.target_name, s.label)
                row = {"method": name, "target": tgt, "setting": label, "length": L, "task": task, "n": n}
                if deadline is not None and time.time() > deadline:
                    row["error"] = f"not run: time limit of {max_minutes:g} min reached"
                    pk_rows.append(row)
                    continue
                try:
                    ck = (L, task, None if s is None else _config_key(s))
                    if ck not in done_pk:
                        done_pk[ck] = run_passkey(model, tok, s, samples, device=dev, backend=backend)
                    agg, rows = done_pk[ck]
                    row.update({k: (_f(v, 4) if isinstance(v, float) else v) for k, v in agg.items()})
                    for r in rows:
                        sample_rows.append({"method": name, "target": tgt, "setting": label, "length": L,
                                            "task": task, **r})
                    _log(f"{task} T={L} {name:15s} {tgt:>10s} {label:28s} acc {agg['acc']:5.1f}% "
                         f"(tokens {agg['token_acc']:5.1f}%, 1st digit {agg['first_token_acc']:5.1f}%) "
                         f"density {agg['density']:.4f}  [{agg['by_depth']}] {agg['seconds']:.1f}s")
                except Exception as e:  # recorded, the others still run
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    _log(f"{task} T={L} {name} {tgt}: ERROR {row['error']}")
                pk_rows.append(row)
            write_csv(pk_rows, out_dir / "passkey.csv")
            write_csv(sample_rows, out_dir / "passkey_samples.csv")
    env["timings"]["passkey_s"] = round(time.time() - t0, 1)

    # 4. summary, table, plots
    write_csv([s.row() for s in all_settings], out_dir / "settings.csv")
    summary = summarize(all_settings, pk_rows, fid, lengths, fid_length, speed)
    write_csv(summary, out_dir / "summary.csv")
    where = f"{device}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    header = (f"Bundled model, {where}, {env['model_dtype']}; passkey: teacher forcing, {n} needles per length "
              f"(depths 0..1), acc = every answer token (space + 7 digits) right, [density] = measured in those forwards; fidelity: "
              f"1 held-out {'code' if fid_prompt == 'code' else 'passkey'} prompt of {fid_length} tokens, all {n_layers} layers and rows. "
              f"Dense (SDPA) passkey: " + ", ".join(f"{L}: {summary[0].get(f'acc_{L}', '-')}%" for L in lengths)
              + ".\n")
    _table_and_plots(summary, out_dir, lengths, fid_length, header, where, n, speed, speed_csv)
    env["timings"]["total_s"] = round(time.time() - t_start, 1)
    (out_dir / "env.json").write_text(json.dumps(env, indent=1, default=str) + "\n")
    _log(f"done in {time.time() - t_start:.0f}s; wrote {sorted(p.name for p in out_dir.iterdir())}")
    return summary


def replot(out_dir, speed_csv: Optional[str] = None) -> list[dict]:
    """replot: rebuild ``summary.csv`` speed-up columns, ``table.md``, ``pareto.png`` and ``speedup.png``
    from a finished run's ``summary.csv`` and ``env.json`` (e.g. on another machine, with ``--speed``)."""
    out_dir = Path(out_dir)
    env = json.loads((out_dir / "env.json").read_text())
    with open(out_dir / "summary.csv", newline="") as f:
        summary = [dict(r) for r in csv.DictReader(f)]
    if not summary:
        raise ValueError(f"out: {out_dir / 'summary.csv'} has no rows")
    lengths = [int(k[4:]) for k in summary[0] if k.startswith("acc_") and k[4:].isdigit()]
    fid_length = int(env["args"]["fid_length"])
    speed = read_speed(speed_csv) if speed_csv else None
    if speed:
        for r in summary:
            for k in [k for k in r if k.startswith("speedup_")]:
                del r[k]
            for T, v in sorted(speed.get(r["method"], {}).items()):
                r[f"speedup_{T}"] = _f(v, 3)
        write_csv(summary, out_dir / "summary.csv")
    text = (out_dir / "table.md").read_text() if (out_dir / "table.md").is_file() else ""
    header = text.split("\n|", 1)[0] if text and not text.startswith("|") else ""
    _table_and_plots(summary, out_dir, lengths, fid_length, header, str(env["args"]["device"]), env["args"]["n"],
                     speed, speed_csv)
    return summary


def _table_and_plots(summary, out_dir: Path, lengths, fid_length: int, header: str, where: str, n, speed,
                     speed_csv) -> None:
    """``table.md``, ``pareto.png`` and (with speed-ups) ``speedup.png`` of a run (``run`` and ``replot``)."""
    write_table(summary, out_dir / "table.md", lengths, fid_length, header)
    title = (f"bundled model, {where}: teacher-forced passkey at {', '.join(map(str, lengths))} tokens "
             f"({n} needles each); fidelity at {fid_length} tokens, all layers")
    plot_pareto(summary, out_dir / "pareto.png", lengths, title)
    if speed:
        plot_speedup(summary, speed, out_dir / "speedup.png", title + f"; speed-up from {os.path.basename(speed_csv)}")


def _environment() -> dict:
    from ..bench.common import environment

    env = environment()
    env["threads"] = torch.get_num_threads()
    return env


def _csv_floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparsattn.eval.prefill_quality",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--densities", default=",".join(map(str, DEFAULT_DENSITIES)))
    p.add_argument("--n", type=int, default=10, help="needles per length (depths linspace(0, 1, n))")
    p.add_argument("--methods", default="", help="comma list (default: the 13 prefill methods)")
    p.add_argument("--tasks", default="passkey", help="passkey and/or multikey_needle")
    p.add_argument("--fid-length", type=int, default=0,
                   help="fidelity length, one of --lengths (default 8192 when listed, else the longest)")
    p.add_argument("--fid-prompt", choices=("code", "passkey"), default="",
                   help="fidelity prompt: held-out source code (default) or a passkey prompt (default with --tiny)")
    p.add_argument("--speed", default="", help="methods benchmark CSV (python -m sparsattn.bench.methods)")
    p.add_argument("--moa-fit", choices=("auto", "on", "off"), default="auto",
                   help="fit MoA plans at each target density (auto: on with CUDA, off otherwise)")
    p.add_argument("--backend", default="", help="attention backend of the patched model (default triton on "
                                                  "CUDA, reference on the CPU)")
    p.add_argument("--max-minutes", type=float, default=-1.0,
                   help="soft wall-clock limit: passkey jobs started after it are recorded as not run "
                        "(0 = none; default 4.5 on CUDA, none on the CPU)")
    p.add_argument("--model", default="", help="model folder (default: the bundled model)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--replot", action="store_true",
                   help="no measurement: rebuild table.md and the plots of the finished run in --out (with --speed)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: 256 tokens, density 0.1, 2 needles, passkey fidelity prompt")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.replot:
        replot(a.out, a.speed or None)
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    lengths, densities, n = _csv_ints(a.lengths), _csv_floats(a.densities), a.n
    if a.tiny:
        lengths, densities, n = [256], [0.1], 2
    max_minutes = a.max_minutes if a.max_minutes >= 0 else (4.5 if a.device.startswith("cuda") else 0.0)
    run(a.out, device=a.device, lengths=lengths, densities=densities, n=n,
        methods=[m for m in a.methods.split(",") if m] or None, tasks=[t for t in a.tasks.split(",") if t],
        fid_length=a.fid_length or None, speed_csv=a.speed or None,
        moa_fit={"auto": None, "on": True, "off": False}[a.moa_fit], backend=a.backend or None,
        max_minutes=max_minutes, model_path=a.model or None,
        fid_prompt=a.fid_prompt or ("passkey" if a.tiny else "code"), tiny=a.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
