"""decode_quality: passkey accuracy vs token budget, top-10 recall and full-budget equality of the decode methods.

Quality half of issue 5 on the bundled model (or any local Llama-style checkpoint), in the shape of
Quest's Table 1 (Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference, arXiv
2406.10774; passkey accuracy per token budget, ``/work/shared/EVAL.md`` section 3).

Protocol, per passkey sample (``sparsattn.eval.tasks.passkey``, RULER niah_single, needle depths
spread over the context: sample i of n sits at depth ``(i + 0.5) / n``; a "length" L means a prompt
of at most ``L - max_new_tokens`` tokens, so prompt and answer stay within L, e.g. the bundled
model's trained 16,384 positions):

1. **Split**: the prompt is cut before its question (``"\\nWhat is the special magic number for
   {key} ... text is"``, about 49 tokens with the bundled tokenizer). Only the part before it is
   prefilled, densely (plain SDPA, unpatched), once per sample; every run starts from a copy of
   that KV cache. If the whole prompt were prefilled, the first answer token would be read by the
   dense prefill and the decode method would never be measured.
2. **Teacher-forced decode**: the question tokens are fed one at a time through the decode path
   (``sparsattn.patched(model, decode=method)``: each layer calls the method's
   ``select(q, k_cache, ctx)`` and ``sparse_decode_attention``), with a ``SparseCache`` so that
   the methods' cross-step state (Quest page bounds, Recycled Attention's recycled set, TidalDecode's
   positions, RetrievalAttention's index) lives for the whole generation.
3. **Answer**: ``max_new_tokens`` greedy tokens, still through the sparse decode path; scored with
   the task's scorer (``string_match_all``, x100).
4. **Top-10 recall** (teacher-forced steps only): for every call of ``select`` (one per layer and
   step) and every query head, the fraction of the 10 keys with the largest exact ``q·k`` over the
   whole cache the method was given that lie inside the method's selection (pages expanded).
   ``top10_recall`` averages over steps, layers and query heads (layers a method keeps dense
   count as 1); ``top10_recall_sparse`` averages only over the calls whose selection did not cover
   the whole cache.
5. **Full budget** (the first ``full_n`` samples of each length): each method with a budget of
   twice the context (covers every token); its generated tokens are compared with the dense
   generation of the same sample (``match_dense`` = fraction of samples with identical tokens;
   ``max_logit_diff`` over the steps that saw the same inputs) and with ``dense_kernel``, every token
   selected and computed by the same sparse decode kernel (``match_kernel_dense``: on a bf16 GPU a
   difference from SDPA can be the kernel's rounding alone).

6. **Needle coverage** (``--needle on``, the default; ``decode_needle``): at the answer steps (the last
   question token and the generated steps up to the answer's length), the heads whose query puts
   >= 0.1 of its dense attention over the cache on the passkey value's tokens *read* the needle, and
   the method *keeps* it in a head when the positions it selected hold >= 0.5 of that attention
   (averaged over the answer steps; the definitions of ``sparsattn.eval.needle``). Columns
   ``needle_reading`` / ``needle_kept`` (heads, summed over samples), ``needle_coverage``,
   ``needle_kept_fraction``; ``dense_kernel`` (every token) gives the reading heads of the reference.

Budgets (``--budgets``): token counts (``64``), fractions of the length L (``0.02``) or
``full``; each is mapped to the method's own hyper-parameters by its ``budget_config`` preset (tokens
read per KV head on the layers the method sparsifies; the rule is written once, in the method's file,
and ``sparsattn list`` / the method's docstring show it). A method with a ``calibrate_from_qk`` preset
(e.g. Double Sparsity's outlier channels) is calibrated inside the driver on a held-out passkey prompt
(a seed no evaluated sample uses). A method with a ``slow`` note (e.g. an HNSW index built on the CPU)
is left out of the default grid. Everything comes from the registry (``decode_budgets``): a registered
decode method with a budget mapping is in the grid without an edit here.

The ``density`` column is the measured fraction of the cache read, averaged over every call
(dense layers included), so methods can be compared on what they really read.

Outputs under ``--out``: ``decode_quality.csv`` (method, budget, length, accuracy, top10_recall, n,
then budget_tokens, top10_recall_sparse, density, match_dense, match_kernel_dense, max_logit_diff,
seconds, then the needle columns; accuracy x100, recall and density in [0, 1]),
``decode_quality_samples.csv`` (one row per run), ``decode_quality_layers.csv`` (recall and
density per layer), ``configs.json`` (the hyper-parameters of every method x budget),
``environment.json`` (torch/transformers/triton versions, device, date, arguments, timing),
``accuracy_vs_budget.png``, ``top10_recall_vs_budget.png`` and ``needle_coverage_vs_budget.png`` (a
panel per length, a line per method, dense as a horizontal line).

Time: samples are the outer loop (sample i at every length, every method and budget), and a new
round starts only if the estimated round time (the last round's) fits in ``--time-limit`` seconds,
so a run ends in time and every cell has the same number of samples (the ``n`` column says how
many; a run that raised is logged, listed under ``errors`` in environment.json, makes the exit
status 1, and leaves its cell one sample short).

CLI: ``python -m sparsattn.eval.decode_quality --out DIR [--device cuda] [--lengths 4096,8192,16384]
[--budgets 64,256,1024] [--n 10] [--methods ...] [--full-n 2] [--time-limit 260]
[--method-config JSON] [--tiny]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..bench.common import write_csv
from ..methods.base import method_class
from ._harness import csv_list as _csv_list
from ._harness import environment as _environment
from ._harness import add_needle_arguments, parse_method_config
from .decode_budgets import (CALIBRATION_SEED, Budget, budget_config, budget_mapped, calibrate_double_sparsity,  # noqa: F401
                             calibrate_from_prompt, calibrating_methods, default_decode_methods, parse_budget,
                             slow_methods)
from .decode_needle import needle_keys
from .decode_report import plot_vs_budget
from .decode_run import (AllTokens, DecodeResult, _cache_kwarg, _model_sizes, decode_run, prefill,  # noqa: F401
                         split_prompt)
from .recall import TOP_K_RECALL, topk_recall  # noqa: F401  (public names of the driver)
from .recorder import SelectRecorder  # noqa: F401
from .scoring import get_scorer
from .tasks import QUESTION_TEMPLATE, Sample, encode_ids, passkey  # noqa: F401

DEFAULT_LENGTHS = (4096, 8192, 16384)
DEFAULT_BUDGETS = ("64", "256", "1024")
#: --tiny: a CPU smoke run (< 1 minute)
TINY = dict(lengths=(384,), budgets=("64",), n=1, full_n=0, max_new_tokens=8)


def __getattr__(attr: str):
    """The registry-derived constants ``BUDGET_MAPPED`` and ``SLOW_METHODS`` (computed on access)."""
    if attr == "BUDGET_MAPPED":
        return budget_mapped()
    if attr == "SLOW_METHODS":
        return slow_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


NEEDLE_COLS = ["needle_reading", "needle_kept", "needle_coverage", "needle_kept_fraction"]
MAIN_COLS = ["method", "budget", "length", "accuracy", "top10_recall", "n", "budget_tokens",
             "top10_recall_sparse", "density", "match_dense", "match_kernel_dense", "max_logit_diff", "seconds"] \
    + NEEDLE_COLS
SAMPLE_COLS = ["method", "budget", "length", "sample", "seed", "depth", "n_tokens", "n_prefill", "n_question",
               "budget_tokens", "score", "prediction", "answer", "top10_recall", "top10_recall_sparse", "density",
               "match_dense", "match_kernel_dense", "max_logit_diff", "seconds", "needle_reading", "needle_kept",
               "needle_kept_fraction"]
LAYER_COLS = ["method", "budget", "length", "layer", "top10_recall", "density", "calls"]


# ----------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------

def _logit_diff(res: DecodeResult, ref: DecodeResult, same_tokens: bool, tail: torch.Tensor) -> float:
    """Max |logit difference| over the steps that saw the same inputs (all of them when the generated
    tokens agree, else the teacher-forced ones)."""
    nstep = res.step_logits.shape[0] if same_tokens else tail.shape[1]
    return float((res.step_logits[:nstep] - ref.step_logits[:nstep]).abs().max())


def _depth(i: int, n: int) -> float:
    return (i + 0.5) / n


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


def _aggregate(srows: list[dict], lrows_raw: list[dict]) -> tuple[list[dict], list[dict]]:
    groups: dict = {}
    for r in srows:
        groups.setdefault((r["method"], r["budget"], r["length"]), []).append(r)
    rows = []
    for (m, b, L), rs in groups.items():
        rows.append({
            "method": m, "budget": b, "length": L, "accuracy": _r(100.0 * _mean([r["score"] for r in rs]), 2),
            "top10_recall": _r(_mean([r["top10_recall"] for r in rs])), "n": len(rs),
            "budget_tokens": rs[0]["budget_tokens"],
            "top10_recall_sparse": _r(_mean([r["top10_recall_sparse"] for r in rs])),
            "density": _r(_mean([r["density"] for r in rs])),
            "match_dense": _r(_mean([None if r.get("match_dense") is None else float(r["match_dense"]) for r in rs])),
            "match_kernel_dense": _r(_mean([None if r.get("match_kernel_dense") is None else float(r["match_kernel_dense"])
                                            for r in rs])),
            "max_logit_diff": (None if all(r["max_logit_diff"] is None for r in rs)
                               else _r(max(r["max_logit_diff"] for r in rs if r["max_logit_diff"] is not None), 6)),
            "seconds": _r(sum(r["seconds"] for r in rs), 2),
            **_needle_agg(rs),
        })
    lg: dict = {}
    for r in lrows_raw:
        key = (r["method"], r["budget"], r["length"], r["layer"])
        a = lg.setdefault(key, [0.0, 0.0, 0])
        a[0] += r["top10_recall"] * r["calls"]
        a[1] += r["density"] * r["calls"]
        a[2] += r["calls"]
    lrows = [{"method": k[0], "budget": k[1], "length": k[2], "layer": k[3], "top10_recall": _r(a[0] / a[2]),
              "density": _r(a[1] / a[2]), "calls": a[2]} for k, a in lg.items() if a[2]]
    return rows, lrows


def _needle_agg(rs: list[dict]) -> dict:
    """Needle columns of one cell: reading / kept heads summed over its samples, coverage = kept / reading,
    kept fraction averaged over the reading heads (None where nothing was recorded)."""
    got = [r for r in rs if r.get("needle_reading") is not None]
    if not got:
        return {k: None for k in NEEDLE_COLS}
    n, k = sum(r["needle_reading"] for r in got), sum(r["needle_kept"] for r in got)
    fr = sum((r["needle_kept_fraction"] or 0.0) * r["needle_reading"] for r in got)
    return {"needle_reading": n, "needle_kept": k, "needle_coverage": _r(k / n) if n else None,
            "needle_kept_fraction": _r(fr / n) if n else None}


def _needle_cells(res: "DecodeResult") -> dict:
    nd = res.needle or {}
    return {"needle_reading": nd.get("needle_reading"), "needle_kept": nd.get("needle_kept"),
            "needle_kept_fraction": _r(nd.get("needle_kept_fraction"))}


def environment(device, args: Optional[dict] = None) -> dict:
    """environment: versions, device and date of a run (``sparsattn._environment.environment``, the one
    record format of the library)."""
    return _environment(device, args)


def run_decode_quality(model=None, tokenizer=None, *, out_dir, device: str = "cpu",
                       lengths: Sequence[int] = DEFAULT_LENGTHS, budgets: Sequence[str] = DEFAULT_BUDGETS,
                       n: int = 10, methods: Optional[Sequence[str]] = None, full_n: int = 2,
                       max_new_tokens: int = 10, seed: int = 0, time_limit: Optional[float] = 260.0,
                       backend: Optional[str] = None, plots: bool = True, model_path=None,
                       method_config: Optional[dict] = None, needle: bool = True, needle_threshold: float = 0.1,
                       needle_keep: float = 0.5,
                       log: Callable[[str], None] = print, t_start: Optional[float] = None) -> dict:
    """run_decode_quality: the whole grid (see the module docstring); writes the outputs under ``out_dir``.

    Args:
        model, tokenizer: a loaded causal LM and tokenizer (None = ``sparsattn.models.load.load_model``
            of ``model_path``, default the bundled checkpoint, on ``device``).
        lengths: context lengths L in tokens (prompts of at most ``L - max_new_tokens``). budgets: ``parse_budget`` strings ("full" is added to
            the checks below anyway). n: samples per length (depths spread). methods: decode
            methods (default: ``default_decode_methods()``, every registered one with a ``budget_config``
            preset except ``SLOW_METHODS``). full_n: samples per
            length that also get the full-budget check (0 = none). max_new_tokens: greedy tokens.
        seed: sample i uses seed ``seed + i``. time_limit: seconds (from ``t_start``, default now)
            within which rounds are started; None = no limit. backend: patched layers' kernel
            backend (None: automatic on CUDA, "reference" on the CPU). method_config: optional
            ``{method: {hyper-parameter: value}}`` overriding the mapped configuration at every budget
            (e.g. ``{"double_sparsity": {"group_factor": 4}}``; double_sparsity is calibrated with its
            ``group_factor``); recorded in configs.json. needle: record the needle coverage of every
            sparse run at the answer steps (``decode_needle``; ``needle_threshold`` / ``needle_keep``
            as in ``sparsattn.eval.needle``).
    Returns:
        ``{"rows", "sample_rows", "layer_rows", "configs", "environment", "files", "errors"}``.
    Raises:
        ValueError: bad arguments (each names the argument).
    """
    from ..methods import get_method, list_methods

    t_start = time.perf_counter() if t_start is None else t_start
    lengths = [int(x) for x in lengths]
    if not lengths or any(L < 64 for L in lengths):
        raise ValueError(f"lengths: expected prompt lengths >= 64 tokens, got {lengths}")
    bl = [parse_budget(b) for b in budgets]
    if len({b.label for b in bl}) != len(bl):
        raise ValueError(f"budgets: duplicates in {list(budgets)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    if not isinstance(full_n, int) or full_n < 0:
        raise ValueError(f"full_n: expected an int >= 0, got {full_n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    for name, v in (("needle_threshold", needle_threshold), ("needle_keep", needle_keep)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(f"{name}: expected a number in (0, 1], got {v!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit: expected seconds > 0 or None, got {time_limit!r}")
    dec = list_methods("decode")
    if methods is None:
        methods = default_decode_methods()
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in dec]
    if bad or not methods:
        raise ValueError(f"methods: expected registered decode methods ({', '.join(dec)}), got {methods}")
    method_config = dict(method_config or {})
    for name, cfg in method_config.items():
        if name not in methods:
            raise ValueError(f"method_config: {name!r} is not among the evaluated methods {methods}")
        if not isinstance(cfg, dict) or "channels" in cfg:
            raise ValueError(f"method_config[{name!r}]: expected a dict of hyper-parameters (not channels), got {cfg!r}")
        get_method(name, **{**budget_config(name, 256, n_layers=8, group_size=4), **cfg})  # valid names/values
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None or tokenizer is None:
        from ..models.load import load_model

        model, tokenizer, _ = load_model(model_path, device=device)
    dev = next(model.parameters()).device
    if backend is None and dev.type == "cpu":
        backend = "reference"  # never the Triton interpreter here (TRITON_INTERPRET may be set)
    n_layers, G = _model_sizes(model)
    scorer = get_scorer("passkey")
    args = {"lengths": lengths, "budgets": [b.label for b in bl], "n": n, "methods": methods, "full_n": full_n,
            "max_new_tokens": max_new_tokens, "seed": seed, "time_limit": time_limit, "backend": backend,
            "dtype": str(next(model.parameters()).dtype), "model": str(model_path or "bundled"),
            "method_config": method_config, "needle": needle, "needle_threshold": needle_threshold,
            "needle_keep": needle_keep}
    env = environment(dev, args)
    log(f"decode_quality: {n_layers} layers, GQA group {G}, device {dev}, dtype {args['dtype']}; "
        f"lengths {lengths}, budgets {[b.label for b in bl]}, methods {methods}, n {n} (full-budget check on {full_n})")

    for name in methods:
        if method_class(name).slow and max(lengths) > 4096:
            log(f"note: {name} {method_class(name).slow}")
    fitted: dict = {}  # method -> configuration entries fitted from q/k (e.g. Double Sparsity's channels)
    for name in calibrating_methods(methods):
        t0 = time.perf_counter()
        fitted[name] = calibrate_from_prompt(name, model, tokenizer, length=min(2048, max(lengths)),
                                             seed=CALIBRATION_SEED + seed, **method_config.get(name, {}))
        log(f"{name}: {', '.join(fitted[name])} calibrated on a held-out passkey prompt "
            f"(seed {CALIBRATION_SEED + seed}) in {time.perf_counter() - t0:.1f}s")

    def make(name: str, btok: int):
        cfg = budget_config(name, btok, n_layers=n_layers, group_size=G)
        cfg.update(method_config.get(name, {}))
        cfg.update(fitted.get(name, {}))
        return get_method(name, **cfg), {k: v for k, v in cfg.items() if k not in fitted.get(name, {})}

    configs: dict = {}
    srows: list[dict] = []
    lraw: list[dict] = []
    files: list[Path] = []
    round_times: list[float] = []
    errors: list[str] = []
    n_done = 0

    def flush():
        rows, lrows = _aggregate(srows, lraw)
        write_csv(rows, out / "decode_quality.csv", MAIN_COLS)
        write_csv(srows, out / "decode_quality_samples.csv", SAMPLE_COLS)
        write_csv(lrows, out / "decode_quality_layers.csv", LAYER_COLS)
        (out / "configs.json").write_text(json.dumps(configs, indent=1, sort_keys=True))
        env["samples_done"] = n_done
        env["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        (out / "environment.json").write_text(json.dumps(env, indent=1))
        return rows, lrows

    for i in range(n):
        elapsed = time.perf_counter() - t_start
        if time_limit is not None and round_times:
            est = round_times[-1]  # the first rounds also hold the JIT warm-up and the full-budget checks
            if elapsed + est > time_limit:
                log(f"time limit: stopping after {n_done} of {n} samples per length "
                    f"(elapsed {elapsed:.0f}s, a round takes ~{est:.0f}s, limit {time_limit:.0f}s)")
                env["stopped_early"] = f"{n_done} of {n} samples (time limit {time_limit}s)"
                break
        t_round = time.perf_counter()
        for L in lengths:
            t_len = time.perf_counter()
            s = passkey(tokenizer, L - max_new_tokens, _depth(i, n), seed=seed + i)  # prompt + answer <= L
            ids, n_pre = split_prompt(tokenizer, s)
            ids_t = torch.tensor([ids], device=dev)
            kv = prefill(model, ids_t[:, :n_pre])
            tail = ids_t[:, n_pre:]
            nk = needle_keys(tokenizer, ids, n_pre, s.answers[0]) if needle else None
            nkw = {} if nk is None else {"needle": nk, "needle_threshold": needle_threshold, "needle_keep": needle_keep}
            base = {"length": L, "sample": i, "seed": seed + i, "depth": round(_depth(i, n), 4),
                    "n_tokens": len(ids), "n_prefill": n_pre, "n_question": len(ids) - n_pre,
                    "answer": s.answers[0]}
            check_full = i < full_n
            dref = decode_run(model, kv, tail, max_new_tokens=max_new_tokens, keep_logits=check_full)
            pred = tokenizer.decode(dref.tokens, skip_special_tokens=True)
            srows.append({**base, "method": "dense", "budget": "dense", "budget_tokens": len(ids),
                          "score": scorer(pred, s.answers), "prediction": pred, "top10_recall": None,
                          "top10_recall_sparse": None, "density": 1.0, "match_dense": None, "max_logit_diff": None,
                          "seconds": round(dref.seconds, 3)})
            msg = [f"dense {'ok' if srows[-1]['score'] == 1 else 'x'}"]
            dk = None
            if check_full:  # every token through the sparse decode kernel: the kernel's own numerics
                try:
                    dk = decode_run(model, kv, tail, max_new_tokens=max_new_tokens, method=AllTokens(), backend=backend,
                                    keep_logits=True, **nkw)
                except Exception as e:  # noqa: BLE001 - recorded and reported
                    errors.append(f"dense_kernel length {L} sample {i}: {type(e).__name__}: {e}")
                    env["errors"] = errors
                    log("ERROR " + errors[-1])
            if dk is not None:
                pred = tokenizer.decode(dk.tokens, skip_special_tokens=True)
                match = dk.tokens == dref.tokens
                srows.append({**base, "method": "dense_kernel", "budget": "full", "budget_tokens": len(ids),
                              "score": scorer(pred, s.answers), "prediction": pred,
                              "top10_recall": _r(dk.recall.get("top10_recall"), 5), "top10_recall_sparse": None,
                              "density": _r(dk.recall.get("density"), 5), "match_dense": match,
                              "match_kernel_dense": True, "max_logit_diff": _r(_logit_diff(dk, dref, match, tail), 6),
                              "seconds": round(dk.seconds, 3), **_needle_cells(dk)})
                msg.append("dense_kernel " + ("=" if match else "!=dense"))
            for name in methods:
                parts = []
                blist = list(bl) + ([Budget("full", 0.0, "full")] if check_full and all(b.kind != "full" for b in bl) else [])
                for b in blist:
                    full = b.kind == "full"
                    if full and not check_full:
                        continue
                    btok = b.tokens(L)
                    meth, cfg = make(name, btok)
                    configs.setdefault(name, {}).setdefault(b.label, {})[str(L)] = cfg
                    try:
                        res = decode_run(model, kv, tail, max_new_tokens=max_new_tokens, method=meth, backend=backend,
                                         keep_logits=full, **nkw)
                    except Exception as e:  # noqa: BLE001 - recorded and reported, the other cells go on
                        err = f"{name} budget {b.label} length {L} sample {i}: {type(e).__name__}: {e}"
                        errors.append(err)
                        env["errors"] = errors
                        log("ERROR " + err)
                        parts.append(f"{b.label}:ERROR")
                        continue
                    pred = tokenizer.decode(res.tokens, skip_special_tokens=True)
                    match = diff = match_k = None
                    if full:
                        match = res.tokens == dref.tokens
                        diff = _logit_diff(res, dref, match, tail)
                        match_k = res.tokens == dk.tokens if dk is not None else None
                    sc = scorer(pred, s.answers)
                    srows.append({**base, "method": name, "budget": b.label, "budget_tokens": btok, "score": sc,
                                  "prediction": pred, "top10_recall": _r(res.recall.get("top10_recall"), 5),
                                  "top10_recall_sparse": _r(res.recall.get("top10_recall_sparse"), 5),
                                  "density": _r(res.recall.get("density"), 5), "match_dense": match,
                                  "match_kernel_dense": match_k,
                                  "max_logit_diff": None if diff is None else _r(diff, 6),
                                  "seconds": round(res.seconds, 3), **_needle_cells(res)})
                    for layer, d in res.recall.get("layers", {}).items():
                        lraw.append({"method": name, "budget": b.label, "length": L, "layer": layer, **d})
                    rec = res.recall.get("top10_recall")
                    tag = f"{b.label}:{'ok' if sc == 1 else 'x'}" + ("" if rec is None else f"/{rec:.2f}")
                    if res.needle.get("needle_reading"):
                        tag += f"/needle {res.needle['needle_kept']}of{res.needle['needle_reading']}"
                    if full:
                        tag += "=" if match else ("!=dense" + ("(=kernel)" if match_k else ""))
                    parts.append(tag)
                msg.append(f"{name} " + " ".join(parts))
            log(f"[sample {i + 1}/{n} len {L} depth {_depth(i, n):.2f}] " + "; ".join(msg)
                + f"  ({time.perf_counter() - t_len:.1f}s, total {time.perf_counter() - t_start:.0f}s)")
            del kv
        n_done = i + 1
        round_times.append(time.perf_counter() - t_round)
        flush()

    rows, lrows = flush()
    files += [out / "decode_quality.csv", out / "decode_quality_samples.csv", out / "decode_quality_layers.csv",
              out / "configs.json", out / "environment.json"]
    if plots and rows:
        files.append(plot_vs_budget(rows, out / "accuracy_vs_budget.png", "accuracy"))
        files.append(plot_vs_budget(rows, out / "top10_recall_vs_budget.png", "top10_recall"))
        if any(r.get("needle_coverage") is not None for r in rows):
            files.append(plot_vs_budget(rows, out / "needle_coverage_vs_budget.png", "needle_coverage"))
    env["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    (out / "environment.json").write_text(json.dumps(env, indent=1))
    log(_table(rows))
    log("wrote " + ", ".join(str(f) for f in files))
    if errors:
        log(f"{len(errors)} run(s) FAILED (listed in environment.json 'errors'; their cells are missing or have a "
            "smaller n):\n  " + "\n  ".join(errors[:20]))
    return {"rows": rows, "sample_rows": srows, "layer_rows": lrows, "configs": configs, "environment": env,
            "files": files, "errors": errors}


def _table(rows: list[dict]) -> str:
    lines = [f"{'method':<20} {'budget':>7} {'length':>6} {'acc':>6} {'top10':>6} {'dens':>6} {'match':>5} {'n':>3}"]
    for r in sorted(rows, key=lambda r: (r["method"] != "dense", r["method"], r["length"], r["budget_tokens"])):
        f = lambda x, w, p=3: (f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}")  # noqa: E731
        lines.append(f"{r['method']:<20} {r['budget']:>7} {r['length']:>6} {f(r['accuracy'], 6, 1)} "
                     f"{f(r['top10_recall'], 6)} {f(r['density'], 6)} {f(r['match_dense'], 5, 2)} {r['n']:>3}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """build_parser: the command line of ``python -m sparsattn.eval.decode_quality``."""
    p = argparse.ArgumentParser(prog="python -m sparsattn.eval.decode_quality",
                                description="Passkey accuracy vs token budget, top-10 recall and full-budget "
                                            "equality of the decode methods (issue 5).")
    p.add_argument("--out", required=True, help="output directory (CSV, JSON, PNG)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--model", default=None, help="local model folder (default: the bundled model)")
    p.add_argument("--lengths", default=None, help=f"comma-separated context lengths L, prompts <= L - max-new-tokens (default {','.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--budgets", default=None, help="comma-separated budgets: tokens (64), fractions (0.02) or full "
                                                   f"(default {','.join(DEFAULT_BUDGETS)})")
    p.add_argument("--n", type=int, default=None, help="samples per length, needle depths spread (default 10)")
    p.add_argument("--methods", default=None, help="comma-separated decode methods (default: every registered one "
                                                   "with a budget_config preset, except the slow ones: "
                                                   + (", ".join(slow_methods()) or "none") + ")")
    p.add_argument("--full-n", type=int, default=None, help="samples per length with the full-budget check (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy answer tokens (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=260.0,
                   help="seconds from start within which new sample rounds are started (0 = no limit)")
    p.add_argument("--backend", default=None, choices=["triton", "reference"],
                   help="kernel backend of the patched layers (default: automatic; reference on the CPU)")
    p.add_argument("--method-config", default=None,
                   help="JSON {method: {hyper-parameter: value}} (or a JSON file) overriding the budget mapping "
                        "at every budget")
    add_needle_arguments(p, what="every sparse run at the answer steps", reads="the answer steps",
                         keeps="the selection")
    p.add_argument("--tiny", action="store_true",
                   help=f"CPU smoke run (< 1 min): lengths {TINY['lengths']}, budgets {TINY['budgets']}, n {TINY['n']}, "
                        "every decode method, no full-budget check (--full-n 1 adds it, ~+35 s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: unchanged; --tiny uses 1, faster on shared cores)")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv=None) -> int:
    """main: the CLI (see ``--help``); returns the exit status."""
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        tiny = args.tiny
        try:
            lengths = [int(x) for x in _csv_list(args.lengths)] if args.lengths else list(
                TINY["lengths"] if tiny else DEFAULT_LENGTHS)
        except ValueError:
            raise ValueError(f"--lengths: expected comma-separated integers, got {args.lengths!r}") from None
        budgets = _csv_list(args.budgets) if args.budgets else list(TINY["budgets"] if tiny else DEFAULT_BUDGETS)
        methods = _csv_list(args.methods) if args.methods else (list(budget_mapped()) if tiny else None)
        n = args.n if args.n is not None else (TINY["n"] if tiny else 10)
        full_n = args.full_n if args.full_n is not None else (TINY["full_n"] if tiny else 2)
        mnt = args.max_new_tokens if args.max_new_tokens is not None else (TINY["max_new_tokens"] if tiny else 10)
        mcfg = parse_method_config(args.method_config)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        threads = args.threads if args.threads is not None else (1 if tiny else None)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads: expected an int >= 1, got {threads}")
            torch.set_num_threads(threads)
        res = run_decode_quality(out_dir=args.out, device=device, lengths=lengths, budgets=budgets, n=n, methods=methods,
                           full_n=full_n, max_new_tokens=mnt, seed=args.seed,
                           time_limit=args.time_limit if args.time_limit and args.time_limit > 0 else None,
                           backend=args.backend, plots=not args.no_plots, model_path=args.model, method_config=mcfg,
                           needle=args.needle == "on", needle_threshold=args.needle_threshold,
                           needle_keep=args.needle_keep,
                           log=lambda s: print(s, flush=True), t_start=t_start)
    except ValueError as e:
        print(f"decode_quality: error: {e}", file=sys.stderr)
        return 2
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
