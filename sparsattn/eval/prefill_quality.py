"""prefill_quality: sparse-prefill quality of every prefill method on the bundled model, at matched densities.

What is measured (issue 4's quality targets: "at <= 10% density, passkey accuracy equal to dense and
attention recall >= 0.9 on the bundled model"):

1. **Settings at a target density** (``prefill_settings``). For each prefill method and each target
   density (5%, 10% by default) and each context length, one hyper-parameter ("knob") of the method
   is searched so that the *measured* density of the patterns it returns (``BlockPattern.density``:
   kept / causal (query, key) pairs, exact at token level, mean over the model's layers and heads) is
   closest to the target, on a calibration passkey prompt of that length that is not scored. Every
   rule is the method's own preset (``sparsattn.methods.base``): the knob and the fixed rules of the
   other hyper-parameters in ``density_knob`` (e.g. A-shape's sink is a quarter of the row budget, at
   most 64; RazorAttention keeps the top n retrieval heads of the shipped calibration that its own
   density allows, ``razor.dense_head_count``, written in the output folder; MASFormer's layer 0 alone is 1/L of the density, so
   below that its A-shape layers take A-shape's setting and the row is marked ``target_met=False``;
   SeerAttention uses the shipped gate in top-k mode with ``last_block_dense=False``), and the
   configurations evaluated as they are in ``fixed_settings`` (dense; a shipped plan that fixes the
   budget, e.g. MInference's or MoA's: one setting, "calibrated", whose density is recorded, not
   chosen). The shipped calibrations are found through ``sparsattn.calibrate``. A calibration whose
   ``sparsattn.calibrate`` module defines ``fit_at_density`` (MoA's plan) is also re-fitted at each
   target (``--refit``; on by default on CUDA).

2. **Passkey decided by the sparse prefill (teacher forcing).** Prefill-phase methods decode
   densely, so a generated passkey reads the needle through dense decode attention after its first
   token. Here the prompt and the gold answer (a space and 7 digits, one token each for the bundled
   tokenizer) run as *one* forward pass of the patched model (every layer sparse through
   ``sparsattn.integrations.hf.patched``), and a sample is correct iff the argmax prediction at every
   answer position equals the gold token: every digit is read through the sparse prefill attention.
   Also reported: the fraction of answer tokens predicted correctly and the first token alone. The
   reference is the unpatched model (transformers' SDPA). Needles at depths ``linspace(0, 1, n)``
   (RULER niah_single, Hsieh et al., arXiv 2404.06654; ``sparsattn.eval.tasks``) in a noise haystack,
   in lines of the held-out source files (``--haystack code``, never seen in training or calibration)
   or in prose lines of the installation's documentation (``--haystack prose``: neither source code nor
   a training template, text the bundled model never saw; issue 21's protocol: ``--haystack prose
   --seed 2112``); the density-search prompt uses the same haystack.

   **Needle coverage** (``--needle on``, the default; ``prefill_needle``): on the same prompts, the heads
   whose answer rows put >= 0.1 of their dense attention on the value's tokens *read* the needle, and
   a setting *keeps* it in a head when its pattern (selected on the dense q/k) keeps >= 0.5 of that
   attention (``sparsattn.eval.needle``). Columns ``needle_reading`` / ``needle_kept`` (heads summed
   over the prompts), ``needle_coverage``, ``needle_kept_fraction``; per prompt and head in
   ``needle.json``. A calibrated method whose ``sparsattn.calibrate`` module defines ``diagnostics``
   (SeerAttention's gate block recall against the oracle) adds ``diag_*`` columns.

3. **Fidelity on every layer** (``sparsattn.eval.fidelity.attention_fidelity``: attention recall,
   MInference arXiv 2407.02490; top-10 recall, Quest arXiv 2406.10774; relative output error;
   density) of the same settings on q/k/v captured from a held-out code prompt
   (``heldout_token_stream``) at one length (8192 by default), all query rows, methods selecting layer by layer in
   order as in a forward.

Outputs in ``--out``: ``settings.csv``, ``passkey.csv``, ``passkey_samples.csv``, ``needle.json``,
``fidelity_layers.csv``, ``summary.csv``, ``table.md`` (paste-ready for docs/methods.md),
``pareto.png`` (passkey accuracy, attention recall and needle coverage vs density), ``speedup.png`` (with
``--speed``: accuracy and recall vs the end-to-end speed-up of ``python -m sparsattn.bench.methods``),
``env.json``.

CLI: ``python -m sparsattn.eval.prefill_quality --out DIR [--device cuda] [--lengths 4096,8192,16384]
[--densities 0.05,0.1] [--n 10] [--methods a,b] [--haystack noise|code|prose] [--seed S] [--calibrations DIR]
[--method-config JSON] [--needle on|off] [--speed methods_bench.csv] [--tiny]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..bench.common import write_csv
from ._harness import add_needle_arguments, csv_floats, csv_ints, environment, parse_method_config, timed_logger
from .prefill_capture import Captured, capture_prompt, fidelity_layers, measure_density, select_all  # noqa: F401
from .prefill_capture import _pool
from .prefill_needle import coverage_of_settings, diagnosers
from .prefill_report import _f, needle_last, plot_pareto, plot_speedup, read_speed, summarize, write_table
from .prefill_settings import (BLOCK, Family, SearchResult, Setting, _calibration_dir, _config_key,  # noqa: F401
                               check_method_specs, default_prefill_methods, fit_at_densities, knob_family,
                               razor_subset,
                               resolve_settings, search_knob, shipped_calibrations)
from .recorder import SelectRecorder
from .teacher_forced import score_teacher_forced, teacher_forced_ids, teacher_forced_predict

__all__ = [
    "PREFILL_METHODS", "Family", "Setting", "SearchResult", "search_knob", "knob_family", "teacher_forced_ids",
    "score_teacher_forced", "teacher_forced_predict", "capture_prompt", "measure_density", "fidelity_layers",
    "resolve_settings", "run", "replot", "write_table", "plot_pareto", "plot_speedup", "read_speed", "main",
    "default_prefill_methods", "shipped_calibrations", "fit_at_densities", "razor_subset",
]

DEFAULT_LENGTHS = (4096, 8192, 16384)
DEFAULT_DENSITIES = (0.05, 0.1)
CAL_SEED = 4242          # calibration passkey prompt (density search; never scored)
SAMPLE_SEED = 0          # scored passkey prompts
FID_SEED = 1000          # held-out code prompt of the fidelity measurement
ANSWER_MARGIN = 16       # prompts are built at length - ANSWER_MARGIN so that prompt + answer <= length
HAYSTACKS = ("noise", "code", "prose")  # passkey haystacks: RULER's noise sentences, held-out source lines,
#: prose lines of the installation's documentation (sparsattn.data.prose: text the bundled model never saw)
HELDOUT_SEED = 2112      # the held-out haystack prompts of issue 21 (--haystack code --seed 2112)

_log = timed_logger("prefill_quality")


def __getattr__(attr: str):
    """``PREFILL_METHODS``: the default method list, computed from the registry on access
    (``default_prefill_methods``; it was a hard-coded tuple of names)."""
    if attr == "PREFILL_METHODS":
        return tuple(default_prefill_methods())
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


# ----------------------------------------------------------------------------------------------
# passkey run
# ----------------------------------------------------------------------------------------------


@dataclass
class PromptSample:
    """PromptSample: one teacher-forcing sample (prompt ids, gold answer ids, needle depth)."""
    task: str
    depth: float
    prompt_ids: list
    answer_ids: list
    answer: str


def make_prompts(tok, task: str, T: int, n: int, seed: int, haystack: str = "noise") -> list[PromptSample]:
    """``n`` teacher-forcing samples of ``task`` (needle depths linspace(0, 1, n)) with prompt + answer <= T
    tokens; ``haystack`` (passkey only): ``"noise"`` (RULER's repeated sentences) or ``"code"`` (lines of
    the held-out source files, ``sparsattn.eval.tasks``)."""
    from .tasks import make_samples

    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack: expected one of {HAYSTACKS}, got {haystack!r}")
    kw = {"haystack": haystack} if task == "passkey" else {}
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
        with SelectRecorder(m, densities=True, reuse_static=True) as rec, warnings.catch_warnings():
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
    # the unpatched model, or a method the integration runs as plain dense attention without calling select
    dense = setting is None or not rec.calls
    agg = {"n": n, "acc": 100.0 * sum(r["correct"] for r in rows) / n,
           "token_acc": 100.0 * sum(r["token_acc"] for r in rows) / n,
           "first_token_acc": 100.0 * sum(r["first_ok"] for r in rows) / n,
           "density": (sum(dens) / len(dens)) if dens else (1.0 if dense else float("nan")),
           "by_depth": " ".join(str(r["correct"]) for r in rows),
           "seconds": time.time() - t0}
    return agg, rows


def _needle_columns(nc: dict) -> dict:
    """The passkey.csv columns of one setting's needle coverage (``prefill_needle.coverage_of_settings``)."""
    a = nc["agg"]
    out = {"needle_reading": a["needle_reading"], "needle_kept": a["needle_kept"],
           "needle_coverage": _f(a["needle_coverage"], 4), "needle_kept_fraction": _f(a["needle_kept_fraction"], 4),
           "needle_missing": a["needle_missing"]}
    for name, per_layer in nc["diagnostics"].items():
        v = [x for x in per_layer if x == x]
        out[f"diag_{name}"] = _f(sum(v) / len(v), 4) if v else ""
    if a.get("needle_error"):
        out["needle_error"] = a["needle_error"]
    return out


# ----------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------

def run(out_dir, *, device: str = "cpu", lengths: Sequence[int] = DEFAULT_LENGTHS,
        densities: Sequence[float] = DEFAULT_DENSITIES, n: int = 10, methods: Optional[Sequence[str]] = None,
        tasks: Sequence[str] = ("passkey",), fid_length: Optional[int] = None, speed_csv: Optional[str] = None,
        refit: Optional[bool] = None, backend: Optional[str] = None, max_minutes: float = 0.0,
        model_path=None, tol: float = 0.1, fid_prompt: str = "code", tiny: bool = False,
        moa_fit: Optional[bool] = None, haystack: str = "noise", seed: int = SAMPLE_SEED,
        calibrations=None, method_config: Optional[dict] = None, needle: bool = True,
        needle_threshold: float = 0.1, needle_keep: float = 0.5, fidelity: bool = True) -> list[dict]:
    """run: the whole measurement (see the module docstring); returns the summary rows.

    ``methods``: default ``default_prefill_methods()``. ``refit``: re-fit the calibrations that can be aimed
    at a density (``fit_at_density`` of a ``sparsattn.calibrate`` module) at each target (None: on CUDA
    unless ``tiny``); ``moa_fit`` is its older name. ``haystack``: the passkey haystack (``"noise"`` or
    ``"code"``: held-out source files), also of the density-search prompt; ``seed``: of the scored
    prompts. ``calibrations``: a folder of calibration files (named as the shipped ones) handed to the
    presets instead of the shipped folder. ``method_config``: ``{method: {hyper-parameter: value}}`` set on
    every configuration of that method (``resolve_settings``' overrides). ``needle``: measure the needle
    coverage of every passkey setting (``prefill_needle``; ``needle_threshold`` / ``needle_keep``).
    ``fidelity``: measure step 3 (False: the fidelity columns stay empty).
    """
    from ..models.load import load_model

    if moa_fit is not None:
        if refit is not None and refit != moa_fit:
            raise ValueError(f"refit/moa_fit: moa_fit is the older name of refit; got both ({refit!r}, {moa_fit!r})")
        refit = moa_fit

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
    methods = list(default_prefill_methods() if not methods else methods)
    check_method_specs(methods)
    for t in tasks:
        if t not in ("passkey", "multikey_needle"):
            raise ValueError(f"tasks: expected 'passkey' and/or 'multikey_needle', got {t!r}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack: expected one of {HAYSTACKS}, got {haystack!r}")
    for nm, v in (("needle_threshold", needle_threshold), ("needle_keep", needle_keep)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(f"{nm}: expected a number in (0, 1], got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    cal_paths = None
    if calibrations is not None:
        if not Path(calibrations).is_dir():
            raise ValueError(f"calibrations: expected a folder of calibration files, got {str(calibrations)!r}")
        cal_paths = shipped_calibrations(calibrations)
    if fid_prompt not in ("code", "passkey"):
        raise ValueError(f"fid_prompt: expected 'code' or 'passkey', got {fid_prompt!r}")
    fid_length = int(fid_length or (8192 if 8192 in lengths else lengths[-1]))
    if fid_length not in lengths:
        raise ValueError(f"fid_length: expected one of the lengths {lengths}, got {fid_length}")
    dev = torch.device(device)
    if backend is None:
        backend = "triton" if dev.type == "cuda" else "reference"
    if refit is None:
        refit = dev.type == "cuda" and not tiny
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

    env = {"environment": environment(dev), "args": {
        "device": device, "lengths": lengths, "densities": densities, "n": n, "methods": methods, "tasks": list(tasks),
        "fid_length": fid_length, "fid_prompt": fid_prompt, "speed_csv": speed_csv, "refit": refit, "backend": backend,
        "max_minutes": max_minutes, "tol": tol, "tiny": tiny, "haystack": haystack, "seed": seed,
        "calibrations": None if calibrations is None else str(calibrations), "method_config": method_config,
        "needle": needle, "needle_threshold": needle_threshold, "needle_keep": needle_keep, "fidelity": fidelity},
        "model": str(mpath), "model_dtype": str(next(model.parameters()).dtype),
        "protocol": {
            "density_search": f"knob searched per (method, target, length) on a calibration passkey prompt "
                              f"(make_samples('passkey', tok, L - {ANSWER_MARGIN}, 1, seed={CAL_SEED}, "
                              f"haystack='{haystack}'), depth 0.5, "
                              "prompt + answer), density = BlockPattern.density mean over all layers; "
                              f"tolerance {tol:g} x target",
            "passkey": f"make_samples(task, tok, L - {ANSWER_MARGIN}, n, seed={seed}, haystack='{haystack}'), "
                       "depths linspace(0, 1, n); one forward over prompt + ' ' + value under patched(model, method, "
                       "backend); correct iff argmax == gold at every answer token (space + 7 digits)",
            "fidelity": (f"heldout_token_stream(tok, {fid_length}, seed={FID_SEED})" if fid_prompt == "code" else
                         f"a passkey prompt (seed {FID_SEED}, depth 0.5) of {fid_length} tokens")
                        + "; all layers, all rows; attention_fidelity(topk=10); rel_error pooled over layers",
            "baseline": "sdpa_dense = the unpatched model (transformers SDPA)",
            "needle_coverage": (f"on the same prompts, dense q/k of prompt + answer: a head reads the needle when the "
                                f"answer rows put >= {needle_threshold:g} of their dense attention on the value's "
                                f"tokens, the setting keeps it when its pattern keeps >= {needle_keep:g} of that "
                                "attention (sparsattn.eval.needle)") if needle else "not measured"},
        "timings": {}}
    fitted = None
    if refit:  # profiled at 4K and 8K (those not above the longest length evaluated)
        t0 = time.time()
        fit_lengths = [x for x in (4096, 8192) if x <= lengths[-1]] or [lengths[-1]]
        fitted = fit_at_densities(model, tok, methods, densities, out_dir, fit_lengths)
        env["timings"]["refit_s"] = round(time.time() - t0, 1)

    # 1. settings per length
    t0 = time.time()
    settings: dict[int, list[Setting]] = {}
    for L in lengths:
        cal = make_prompts(tok, "passkey", L, 1, CAL_SEED, haystack)[0]
        ids = torch.tensor([cal.prompt_ids + cal.answer_ids], device=dev)
        cap = capture_prompt(model, ids)
        settings[L] = resolve_settings(methods, densities, L, cap, n_layers=n_layers, n_heads=n_heads,
                                       out_dir=out_dir, fitted=fitted, tol=tol, calibrations=cal_paths,
                                       overrides=method_config)
        del cap
        write_csv([s.row() for Ls in settings.values() for s in Ls], out_dir / "settings.csv")
    env["timings"]["settings_s"] = round(time.time() - t0, 1)
    all_settings = [s for Ls in settings.values() for s in Ls]

    # 2. fidelity at one length, every layer
    t0 = time.time()
    cap = None
    if fidelity and fid_prompt == "code":
        from .perplexity import heldout_token_stream

        ids = heldout_token_stream(tok, fid_length, seed=FID_SEED)[None].to(dev)
        cap = capture_prompt(model, ids)
    elif fidelity:
        fp = make_prompts(tok, "passkey", fid_length, 1, FID_SEED)[0]
        ids = torch.tensor([fp.prompt_ids + fp.answer_ids], device=dev)
        cap = capture_prompt(model, ids)
    fid_rows: list[dict] = []
    fid: dict = {}
    done_fid: dict = {}  # identical configurations (e.g. a budget clamped for two targets) are measured once
    for s in settings[fid_length] if fidelity else []:
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
    needle_docs: list[dict] = []
    diag = diagnosers(methods) if needle else {}
    for L in lengths:
        for task in tasks:
            samples = make_prompts(tok, task, L, n, seed, haystack)
            jobs: list = [None] + [s for s in settings[L] if not s.error]
            cov: dict = {}
            if needle and (deadline is None or time.time() <= deadline):
                keyed = {(L, task, None if s is None else _config_key(s)): s for s in jobs}
                cov = coverage_of_settings(model, tok, samples, keyed, device=dev, threshold=needle_threshold,
                                           keep=needle_keep, diagnose=diag, log=_log)
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
                    nc = cov.get(ck)
                    if nc is not None:
                        row.update(_needle_columns(nc))
                        needle_docs.append({"method": name, "target": tgt, "setting": label, "length": L,
                                            "task": task, **nc["agg"], "diagnostics": nc["diagnostics"],
                                            "samples": nc["samples"]})
                    by_sample = {x["sample"]: x for x in (nc or {}).get("samples", [])}
                    for r in rows:
                        extra = by_sample.get(r["sample"])
                        sample_rows.append({"method": name, "target": tgt, "setting": label, "length": L,
                                            "task": task, **r,
                                            **({} if nc is None else {
                                                "needle_reading": "" if extra is None else extra["needle_reading"],
                                                "needle_kept": "" if extra is None else extra["needle_kept"]})})
                    _log(f"{task} T={L} {name:15s} {tgt:>10s} {label:28s} acc {agg['acc']:5.1f}% "
                         f"(tokens {agg['token_acc']:5.1f}%, 1st digit {agg['first_token_acc']:5.1f}%) "
                         f"density {agg['density']:.4f}  [{agg['by_depth']}] {agg['seconds']:.1f}s"
                         + ("" if nc is None else f"; needle kept {nc['agg']['needle_kept']}/"
                            f"{nc['agg']['needle_reading']}"))
                except Exception as e:  # recorded, the others still run
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    _log(f"{task} T={L} {name} {tgt}: ERROR {row['error']}")
                pk_rows.append(row)
            write_csv(pk_rows, out_dir / "passkey.csv", needle_last(pk_rows))
            write_csv(sample_rows, out_dir / "passkey_samples.csv")
            if needle_docs:
                (out_dir / "needle.json").write_text(json.dumps({"protocol": env["protocol"]["needle_coverage"],
                                                                 "rows": needle_docs}, default=str) + "\n")
    env["timings"]["passkey_s"] = round(time.time() - t0, 1)

    # 4. summary, table, plots
    write_csv([s.row() for s in all_settings], out_dir / "settings.csv")
    summary = summarize(all_settings, pk_rows, fid, lengths, fid_length, speed)
    write_csv(summary, out_dir / "summary.csv", needle_last(summary))
    where = f"{device}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    header = (f"Bundled model, {where}, {env['model_dtype']}; passkey: teacher forcing, {n} needles per length "
              f"(depths 0..1), acc = every answer token (space + 7 digits) right, [density] = measured in those forwards; fidelity: "
              f"1 held-out {'code' if fid_prompt == 'code' else 'passkey'} prompt of {fid_length} tokens, all {n_layers} layers and rows. "
              f"Dense (SDPA) passkey: " + ", ".join(f"{L}: {summary[0].get(f'acc_{L}', '-')}%" for L in lengths)
              + "." + (f" Haystack: {haystack}, seed {seed}." if (haystack, seed) != ("noise", SAMPLE_SEED) else "")
              + (f" Needle kept: reading heads (answer rows put >= {needle_threshold:g} of their dense attention "
                 f"on the value's tokens) whose pattern keeps >= {needle_keep:g} of it, summed over the prompts."
                 if needle else "") + "\n")
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
        write_csv(summary, out_dir / "summary.csv", needle_last(summary))
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


def build_parser() -> argparse.ArgumentParser:
    """build_parser: the command line of ``python -m sparsattn.eval.prefill_quality``."""
    p = argparse.ArgumentParser(prog="python -m sparsattn.eval.prefill_quality",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--densities", default=",".join(map(str, DEFAULT_DENSITIES)))
    p.add_argument("--n", type=int, default=10, help="needles per length (depths linspace(0, 1, n))")
    p.add_argument("--methods", default="", help="comma list (default: every registered prefill method with a "
                                                  "density_knob or fixed_settings preset); NAME:VARIANT = a "
                                                  "searched family of the method's density_variants preset "
                                                  "(e.g. seer_attention:threshold)")
    p.add_argument("--tasks", default="passkey", help="passkey and/or multikey_needle")
    p.add_argument("--fid-length", type=int, default=0,
                   help="fidelity length, one of --lengths (default 8192 when listed, else the longest)")
    p.add_argument("--fid-prompt", choices=("code", "passkey"), default="",
                   help="fidelity prompt: held-out source code (default) or a passkey prompt (default with --tiny)")
    p.add_argument("--speed", default="", help="methods benchmark CSV (python -m sparsattn.bench.methods)")
    p.add_argument("--refit", "--moa-fit", dest="refit", choices=("auto", "on", "off"), default="auto",
                   help="re-fit the calibrations that can be aimed at a density (a sparsattn.calibrate module's "
                        "fit_at_density) at each target (auto: on with CUDA, off otherwise; --moa-fit: older name)")
    p.add_argument("--backend", default="", help="attention backend of the patched model (default triton on "
                                                  "CUDA, reference on the CPU)")
    p.add_argument("--max-minutes", type=float, default=-1.0,
                   help="soft wall-clock limit: passkey jobs started after it are recorded as not run "
                        "(0 = none; default 4.5 on CUDA, none on the CPU)")
    p.add_argument("--model", default="", help="model folder (default: the bundled model)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--replot", action="store_true",
                   help="no measurement: rebuild table.md and the plots of the finished run in --out (with --speed)")
    p.add_argument("--haystack", choices=HAYSTACKS, default="noise",
                   help="passkey haystack: RULER's noise sentences (default), 'code' (lines of the held-out "
                        "source files) or 'prose' (prose lines of the installation's documentation, never seen "
                        f"in training or calibration; issue 21's protocol with --seed {HELDOUT_SEED})")
    p.add_argument("--seed", type=int, default=SAMPLE_SEED, help=f"seed of the scored prompts ({SAMPLE_SEED})")
    p.add_argument("--calibrations", default="", help="folder of calibration files named as the shipped ones "
                                                      "(default: the bundled model's shipped calibrations)")
    p.add_argument("--method-config", default="", help="JSON {method: {hyper-parameter: value}} (inline or a file) "
                                                       "set on every configuration of that method")
    add_needle_arguments(p, what="every passkey setting", reads="its answer rows", keeps="the pattern")
    p.add_argument("--fidelity", choices=("on", "off"), default="on",
                   help="the fidelity step on every layer of one prompt (off: passkey and needle coverage only)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: 256 tokens, density 0.1, 2 needles, passkey fidelity prompt")
    return p


def main(argv=None) -> int:
    """main: the command line (see ``--help``); returns the exit status."""
    a = build_parser().parse_args(argv)
    if a.replot:
        replot(a.out, a.speed or None)
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    lengths, densities, n = csv_ints(a.lengths, "--lengths"), csv_floats(a.densities, "--densities"), a.n
    if a.tiny:
        lengths, densities, n = [256], [0.1], 2
    max_minutes = a.max_minutes if a.max_minutes >= 0 else (4.5 if a.device.startswith("cuda") else 0.0)
    run(a.out, device=a.device, lengths=lengths, densities=densities, n=n,
        methods=[m for m in a.methods.split(",") if m] or None, tasks=[t for t in a.tasks.split(",") if t],
        fid_length=a.fid_length or None, speed_csv=a.speed or None,
        refit={"auto": None, "on": True, "off": False}[a.refit], backend=a.backend or None,
        max_minutes=max_minutes, model_path=a.model or None,
        fid_prompt=a.fid_prompt or ("passkey" if a.tiny else "code"), tiny=a.tiny, haystack=a.haystack,
        seed=a.seed, calibrations=a.calibrations or None, method_config=parse_method_config(a.method_config),
        needle=a.needle == "on", needle_threshold=a.needle_threshold, needle_keep=a.needle_keep,
        fidelity=a.fidelity == "on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
