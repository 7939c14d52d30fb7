"""evaluate: the method x task x length evaluation grid (``sparsattn eval``).

For every registered method named, the model is patched with the method
(``sparsattn.integrations.hf.patched``; ``dense`` is the unpatched model, i.e. transformers' own
SDPA attention), greedy answers are generated for offline RULER-style tasks (Hsieh et al.,
"RULER: What's the Real Context Size of Your Long-Context Language Models?", arXiv 2404.06654)
and scored with ``string_match_all`` (x100). Beside the accuracy each row reports:

- ``density``: the mean density (computed / causal pairs) of the prefill patterns the method
  actually returned while the answers were generated (every layer, every batch), recorded by
  wrapping the method instance's ``select``; ``decode_density`` likewise for decode-phase methods
  (selected cached tokens / cached tokens). The integration itself exposes no per-call statistics.
- with ``fidelity=True``: attention recall, top-k recall (k = 10), relative output error, count of
  output elements off by more than 5e-3, and the density of the method's pattern against dense
  attention on q/k/v captured (``sparsattn.capture.capture_qkv``) from the model on one real prompt
  per length, on a few layers (first / middle / last by default) and the last ``fidelity_rows``
  query rows (1024 by default; the rows that read the longest contexts). The method selects on
  every layer in order up to the last chosen one (so cross-layer state is as in a real forward);
  fidelity is measured on the chosen layers only. (Attention recall: MInference, arXiv 2407.02490; top-k recall: Quest,
  arXiv 2406.10774.)

Methods that need fitting (``needs`` non-empty: calibrated MInference, RazorAttention,
SeerAttention gates, MoA plans) are skipped with a note unless ``method_config`` gives the fitted
file (e.g. ``{"minference": {"path": "plan.json"}}``) so that the instance is fitted.

Outputs in ``out_dir``: ``eval.csv`` (one row per method x task x length), ``eval_samples.csv``
(one row per generated answer), ``accuracy_vs_density.png`` (a panel per task, a point per
method x length) and, for needle tasks, ``needle_heatmap_<task>.png`` (a panel per method,
accuracy by depth x length).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .bench.common import write_csv
from .eval._harness import parse_method_config, pyplot  # noqa: F401  (parse_method_config: re-exported)
from .eval.recorder import SelectRecorder

__all__ = ["run_eval", "main", "load_model", "ModelPathError", "COLUMNS", "SAMPLE_COLUMNS", "resolve_methods"]

#: columns of eval.csv, in order
COLUMNS = ["method", "task", "length", "n_samples", "n_tokens", "accuracy", "density", "decode_density",
           "recall", "topk_recall", "rel_error", "n_large_error", "fid_density", "fid_layers",
           "seconds", "speedup_vs_dense", "config"]
#: columns of eval_samples.csv
SAMPLE_COLUMNS = ["method", "task", "length", "sample", "depth", "n_tokens", "score", "answers", "prediction"]

_FITTED_HINT = ("give the fitted file through --method-config, e.g. "
                "'{\"minference\": {\"path\": \"plan.json\"}}'")


# model loading: the one loader (``sparsattn.models.load``); the names stay importable from here
from .models.load import ModelPathError, load_model  # noqa: E402,F401


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------

def resolve_methods(methods: Sequence[str], method_config: Optional[dict] = None, *,
                    verbose: bool = True) -> dict[str, Any]:
    """resolve_methods: ``{name: Method instance or None (dense baseline)}``; fitting-needing methods
    without a fitted configuration are left out with a printed note.

    Raises:
        ValueError: an unknown method name (the message lists the registered ones), or a bad config.
    """
    from .methods import get_method, method_class

    method_config = dict(method_config or {})
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods: expected a non-empty list of method names, got {methods!r}")
    names = list(dict.fromkeys(methods))
    for n in names:
        method_class(n)  # ValueError listing the valid names
    bad = sorted(set(method_config) - set(names))
    if bad:
        raise ValueError(f"method_config: configuration given for method(s) {bad} that are not evaluated "
                         f"(methods: {names})")
    out: dict[str, Any] = {}
    for n in names:
        cfg = method_config.get(n) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"method_config[{n!r}]: expected a dict of hyper-parameters, got {cfg!r}")
        cls = method_class(n)
        if cls.exact and not cfg:  # exact attention: the unpatched model is the baseline
            out[n] = None
            continue
        if cls.needs and not cfg:
            if verbose:
                print(f"note: skipping {n!r}: it needs {list(cls.needs)} before use; {_FITTED_HINT}")
            continue
        m = get_method(n, **cfg)
        if not m.is_fitted:
            if verbose:
                print(f"note: skipping {n!r}: still needs {list(m.needs)} with config {cfg}; {_FITTED_HINT}")
            continue
        out[n] = m
    return out


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------

def apply_chat_template(tok, prompts: list[str]) -> list[str]:
    """apply_chat_template: each prompt as one user turn of the tokenizer's chat template, followed by
    the assistant's generation prompt (``tokenizer.apply_chat_template(..., add_generation_prompt=True)``).

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if not getattr(tok, "chat_template", None):
        raise ValueError("chat_template: the model's tokenizer has no chat template (tokenizer_config.json has no "
                         "'chat_template'); run without --chat-template, or use an instruction-tuned model that has one")
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def _generate(model, tok, prompts: list[str], *, device, max_new_tokens: int,
              add_special_tokens: bool = True) -> list[str]:
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    ids = enc["input_ids"].to(device)
    am = enc["attention_mask"].to(device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
    return tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# fidelity
# ----------------------------------------------------------------------------------------------

def _pattern_rows(p, row0: int = 0):
    """Row provider (q0, q1) -> bool [1, H, q1 - q0, Tk] of a BlockPattern (batch 0) for its query rows
    ``row0 + q0 .. row0 + q1``; never T x T at once."""
    bq = p.block_q

    def rows(q0: int, q1: int) -> torch.Tensor:
        a, z = row0 + q0, row0 + q1
        qb0, qb1 = a // bq, -(-z // bq)
        m = p.mask_rows(0, qb0, qb1)
        return m[:, a - qb0 * bq: z - qb0 * bq][None]

    return rows


def _fidelity_layers(n_layers: int, layers=None) -> list[int]:
    if layers is not None:
        return sorted({int(l) for l in layers})
    return sorted({0, n_layers // 2, n_layers - 1})


def _fidelity(model, tok, prompt: str, methods: dict, *, device, layers=None, rows=None,
              add_special_tokens: bool = True) -> dict[str, dict]:
    """{method: pooled fidelity summary} on one prompt (dense baseline: recall 1 by definition)."""
    from .capture import capture_qkv
    from .eval import attention_fidelity
    from .integrations.hf import attention_modules
    from .methods.base import SelectContext
    from .patterns import BlockPattern

    mods = attention_modules(model)
    order = sorted(mods)
    fl = [order[i] for i in _fidelity_layers(len(order), layers) if 0 <= i < len(order)]
    ids = tok(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)["input_ids"].to(device)
    last = max(fl)
    cap = capture_qkv(model, ids, layers=[l for l in order if l <= last])
    out: dict[str, dict] = {}
    for name, m in methods.items():
        if m is None:
            out[name] = {"recall": 1.0, "topk_recall": 1.0, "rel_error": 0.0, "n_large_error": 0,
                         "fid_density": 1.0, "fid_layers": " ".join(map(str, fl))}
            continue
        if m.phase != "prefill":
            continue  # decode-phase methods run dense at prefill: no prefill pattern to compare
        if getattr(m, "needs_pre_rope", False):
            print(f"note: no fidelity for {name!r}: it selects on pre-RoPE q/k, which capture_qkv does not record")
            continue
        state: dict = {}
        reps = []
        for l in order:
            if l > last:
                break
            q, k, v = cap[l]
            G = q.shape[1] // k.shape[1]
            ctx = SelectContext(layer=l, causal=True, scale=float(getattr(mods[l], "scaling", q.shape[-1] ** -0.5)),
                                q_offset=0, state=state,
                                extras={"phase": "prefill", "q_lens": None, "kv_lens": None, "padding_side": "right",
                                        "sliding_window": None, "num_kv_groups": G})
            p = m.select(q, k, ctx)
            if l not in fl:
                continue
            if not isinstance(p, BlockPattern):
                raise ValueError(f"method {name!r}: select() returned {type(p).__name__}; expected a BlockPattern")
            T = q.shape[2]
            r0 = 0 if rows is None else max(0, T - int(rows))
            # the last rows: causal alignment is bottom-right, so they are exactly the pattern's rows r0..T
            reps.append(attention_fidelity(q[:, :, r0:].float(), k.float(), v.float(), _pattern_rows(p, r0),
                                           causal=True, scale=ctx.scale))
        err = sum(float(r.err_sq.sum()) for r in reps)
        ref = sum(float(r.ref_sq.sum()) for r in reps)
        out[name] = {
            "recall": sum(float(r.recall.mean()) for r in reps) / len(reps),
            "topk_recall": sum(float(r.topk_recall.mean()) for r in reps) / len(reps),
            "rel_error": math.sqrt(err) / math.sqrt(ref) if ref > 0 else 0.0,
            "n_large_error": int(sum(int(r.n_large_error.sum()) for r in reps)),
            "fid_density": sum(float(r.density.mean()) for r in reps) / len(reps),
            "fid_layers": " ".join(map(str, fl)),
        }
    return out


# ----------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------

def _check_ints(name: str, xs, lo: int = 1) -> list[int]:
    if isinstance(xs, (int, str)) or xs is None or len(xs) == 0:
        raise ValueError(f"{name}: expected a non-empty list of ints >= {lo}, got {xs!r}")
    out = []
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or x < lo:
            raise ValueError(f"{name}: expected ints >= {lo}, got {x!r}")
        out.append(x)
    return out


def run_eval(model_path=None, methods: Sequence[str] = ("dense", "a_shape", "vertical_slash"),
             tasks: Sequence[str] = ("passkey",), lengths: Sequence[int] = (2048, 4096), n_samples: int = 4,
             depths: Optional[Sequence[float]] = None, method_config: Optional[dict] = None,
             out_dir="sparsattn_eval", device: str = "cpu", batch_size: int = 4, progress: bool = True,
             fidelity: bool = True, seed: int = 0, max_new_tokens: int = 12, fidelity_layers=None,
             fidelity_rows: Optional[int] = 1024, dtype=None, title: str = "", show: bool = True,
             allow_download: bool = False, device_map=None, chat_template: bool = False) -> list[dict]:
    """run_eval: accuracy, pattern density and fidelity of methods x tasks x lengths on a model.

    Args:
        model_path: local Hugging Face folder; None = the bundled checkpoint; a Hub name (``owner/name``)
            only with ``allow_download=True``.
        methods: registered method names (``sparsattn list``); ``dense`` = the unpatched model.
        tasks: task names of ``sparsattn.eval.TASKS``.
        lengths: prompt lengths in tokens.
        n_samples: samples per (task, length), or per (task, length, depth) when ``depths`` is given.
        depths: needle depths in [0, 1] for needle tasks; default sweeps ``linspace(0, 1, n_samples)``.
        method_config: ``{method: {hyper-parameter: value}}`` (also how a fitted file is given).
        out_dir: folder for eval.csv, eval_samples.csv and the PNGs.
        device: torch device. batch_size: prompts per ``generate`` call (left padding).
        progress: tqdm bars. fidelity: compute fidelity metrics (one prompt per length).
        seed: sample seed. max_new_tokens: greedy tokens generated per prompt.
        fidelity_layers: layer indices for fidelity (default first / middle / last).
        fidelity_rows: fidelity on the last this many query rows of the prompt (those that read the
            longest contexts; the question sits there), None = all rows. ``fid_density`` is over these rows.
        dtype: weight dtype (default float32 on the CPU).
        show: print the table and the list of written files (False: a caller prints its own).
        allow_download: allow downloading a Hub model name (off by default: offline).
        device_map: ``from_pretrained``'s device map (e.g. ``"auto"``; needs ``accelerate``) instead of
            ``device``; inputs go to the device of the input embeddings.
        chat_template: wrap every prompt as a user turn of the tokenizer's chat template (ValueError
            when it has none).
    Returns:
        one dict per (method, task, length) with the keys of ``COLUMNS``.
    Raises:
        ValueError: unknown method/task names (listing valid ones), bad lengths/depths/sizes.
        ModelPathError: the model path does not exist or holds no weights.
        ValueError: a Hub name without ``allow_download``; ``chat_template`` with a tokenizer that has none.
    """
    from .eval import DEPTH_TASKS, get_task, make_samples, score_predictions
    from .eval.scoring import get_scorer

    tasks = list(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
    if not tasks:
        raise ValueError("tasks: expected at least one task name")
    for t in tasks:
        get_task(t)
        get_scorer(t)
    lengths = _check_ints("lengths", list(lengths) if not isinstance(lengths, int) else lengths, 16)
    _check_ints("n_samples", [n_samples])
    _check_ints("batch_size", [batch_size])
    _check_ints("max_new_tokens", [max_new_tokens])
    if depths is not None:
        depths = [float(d) for d in depths]
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths: expected values in [0, 1], got {depths!r}")
    resolved = resolve_methods([methods] if isinstance(methods, str) else list(methods), method_config)
    if not resolved:
        raise ValueError("methods: nothing left to evaluate (every method needs fitting)")
    model, tok, path = load_model(model_path, device=device, dtype=dtype, device_map=device_map,
                                  allow_download=allow_download)
    if device_map is not None:
        device = str(model.get_input_embeddings().weight.device)
    if chat_template:
        apply_chat_template(tok, ["check"])  # refuse before any sample is generated
    max_pos = getattr(model.config, "max_position_embeddings", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    # samples, generated once and shared by all methods
    samples: dict[tuple[str, int], list] = {}
    for t in tasks:
        for L in lengths:
            if t in DEPTH_TASKS and depths is not None:
                ss = []
                for di, d in enumerate(depths):
                    ss += make_samples(t, tok, L, n_samples, seed=seed + 7919 * di, progress=progress, depth=d)
            else:
                ss = make_samples(t, tok, L, n_samples, seed=seed, progress=progress)
            if chat_template:
                ss = [dataclasses.replace(s, prompt=p) for s, p in zip(ss, apply_chat_template(tok, [s.prompt for s in ss]))]
            samples[(t, L)] = ss

    fid: dict[int, dict] = {}
    if fidelity:
        for L in tqdm(lengths, desc="fidelity", disable=not progress):
            prompt = samples[(tasks[0], L)][0].prompt
            fid[L] = _fidelity(model, tok, prompt, resolved, device=device, layers=fidelity_layers,
                               rows=fidelity_rows, add_special_tokens=not chat_template)

    rows: list[dict] = []
    srows: list[dict] = []
    cells = [(n, t, L) for n in resolved for t in tasks for L in lengths]
    bar = tqdm(total=sum(len(samples[(t, L)]) for _, t, L in cells), desc="eval", disable=not progress)
    from .integrations.hf import patched

    for name, t, L in cells:
        m = resolved[name]
        ss = samples[(t, L)]
        t0 = time.perf_counter()
        preds: list[str] = []
        rec = SelectRecorder(m, densities=True) if m is not None else None
        if m is None and max_pos and max(s.meta.get("n_tokens", L) for s in ss) > max_pos:
            warnings.warn(f"sparsattn eval: context of {L} tokens is longer than the model's trained length "
                          f"(config.max_position_embeddings={max_pos}); quality may degrade", stacklevel=2)
        for i in range(0, len(ss), batch_size):
            batch = [s.prompt for s in ss[i:i + batch_size]]
            if m is None:
                preds += _generate(model, tok, batch, device=device, max_new_tokens=max_new_tokens,
                                   add_special_tokens=not chat_template)
            else:
                with rec, patched(model, method=m):
                    preds += _generate(model, tok, batch, device=device, max_new_tokens=max_new_tokens,
                                       add_special_tokens=not chat_template)
            bar.update(len(batch))
        secs = time.perf_counter() - t0
        scorer = get_scorer(t)
        for j, (s, p) in enumerate(zip(ss, preds)):
            srows.append({"method": name, "task": t, "length": L, "sample": j, "depth": s.meta.get("depth"),
                          "n_tokens": s.meta.get("n_tokens"), "score": 100.0 * scorer(p, s.answers),
                          "answers": " | ".join(s.answers), "prediction": p})
        if m is None:
            dens, ddens = 1.0, 1.0
        else:
            dens = rec.mean_density(1.0, phase="prefill")
            ddens = rec.mean_density(1.0, phase="decode")
        row = {"method": name, "task": t, "length": L, "n_samples": len(ss),
               "n_tokens": round(sum(s.meta.get("n_tokens", 0) for s in ss) / len(ss), 1),
               "accuracy": score_predictions(t, preds, [s.answers for s in ss]),
               "density": dens, "decode_density": ddens, "seconds": round(secs, 2),
               "config": json.dumps(m.config() if m is not None else {}, sort_keys=True, default=str)}
        f = fid.get(L, {}).get(name)
        for c in ("recall", "topk_recall", "rel_error", "n_large_error", "fid_density", "fid_layers"):
            row[c] = None if f is None else f[c]
        rows.append(row)
    bar.close()
    _add_speedup(rows, baselines={n for n, m in resolved.items() if m is None})

    write_csv(rows, out / "eval.csv", COLUMNS)
    write_csv(srows, out / "eval_samples.csv", SAMPLE_COLUMNS)
    from .bench.common import print_table

    if show:
        print_table(rows, [c for c in COLUMNS if c not in ("config", "fid_layers", "n_large_error", "decode_density")],
                    title=title or f"sparsattn eval: {path.name} ({device})")
    written = [out / "eval.csv", out / "eval_samples.csv"]
    written.append(plot_accuracy_vs_density(rows, out / "accuracy_vs_density.png"))
    if any(r.get("speedup_vs_dense") for r in rows):
        written.append(plot_accuracy_vs_density(rows, out / "accuracy_vs_speedup.png", x="speedup_vs_dense"))
    for t in tasks:
        if t in DEPTH_TASKS:
            written.append(plot_needle_heatmap(srows, t, out / f"needle_heatmap_{t}.png"))
    if show:
        print("wrote " + ", ".join(str(w) for w in written))
    return rows


def _add_speedup(rows: list[dict], baselines) -> None:
    """speedup_vs_dense = wall time of the baseline run (an ``exact`` method run unpatched, named in
    ``baselines``) / the method's, same task and length (the whole generation on this device: on
    the CPU the sparse path is the torch reference)."""
    for r in rows:
        d = next((x for x in rows if x["method"] in baselines and x["task"] == r["task"] and x["length"] == r["length"]),
                 None)
        ok = d is not None and r.get("seconds") and d.get("seconds")
        r["speedup_vs_dense"] = round(d["seconds"] / r["seconds"], 4) if ok else None


def plot_accuracy_vs_density(rows: list[dict], path, x: str = "density") -> Path:
    """plot_accuracy_vs_density: a panel per task, a point per method x length (marker = length);
    ``x="speedup_vs_dense"`` plots accuracy against the measured speed-up instead (log axis)."""
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    markers = "osD^vP*X"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for mi, mname in enumerate(methods):
            for li, L in enumerate(lengths):
                r = next((r for r in rows if r["task"] == t and r["method"] == mname and r["length"] == L), None)
                if r is None:
                    continue
                if r.get(x) is None:
                    continue
                ax.scatter(r[x], r["accuracy"], color=colors[mi % len(colors)],
                           marker=markers[li % len(markers)], s=50,
                           label=mname if li == 0 else None, edgecolors="k", linewidths=0.4)
        if x == "density":
            ax.set_xlim(0, 1.05)
            ax.set_xlabel("density (computed / causal pairs)")
        else:
            ax.set_xscale("log")
            ax.axvline(1.0, color="k", lw=0.6)
            ax.set_xlabel("speed-up vs dense (wall time of the run, this device)")
        ax.set_ylim(-5, 105)
        ax.set_ylabel("accuracy (string_match_all x100)")
        ax.set_title(f"{t}; markers: " + ", ".join(f"{markers[i % len(markers)]}={L}" for i, L in enumerate(lengths)),
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_needle_heatmap(srows: list[dict], task: str, path) -> Path:
    """plot_needle_heatmap: a panel per method, mean score by needle depth (rows) x length (columns)."""
    plt = pyplot()
    rs = [r for r in srows if r["task"] == task]
    methods = list(dict.fromkeys(r["method"] for r in rs))
    lengths = sorted({r["length"] for r in rs})
    depths = sorted({round(float(r["depth"]), 3) for r in rs if r["depth"] is not None})
    nm = max(1, len(methods))
    fig, axes = plt.subplots(1, nm, figsize=(1.5 + (1.0 + 0.8 * len(lengths)) * nm, 2.0 + 0.35 * max(1, len(depths))),
                             squeeze=False, sharey=True)
    im = None
    for mi, (ax, mname) in enumerate(zip(axes[0], methods)):
        grid = torch.full((max(1, len(depths)), len(lengths)), float("nan"))
        for di, d in enumerate(depths):
            for li, L in enumerate(lengths):
                sc = [r["score"] for r in rs if r["method"] == mname and r["length"] == L
                      and r["depth"] is not None and round(float(r["depth"]), 3) == d]
                if sc:
                    grid[di, li] = sum(sc) / len(sc)
        im = ax.imshow(grid.numpy(), vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_xlabel("length", fontsize=8)
        if mi == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(mname, fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"{task}: accuracy by depth x length", fontsize=10, y=1.02)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def _csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsattn eval", description="method x task x length grid: accuracy, density and fidelity vs dense",
        epilog="Methods that need fitting (minference calibrated plans, razor, seer_attention, moa) are skipped "
               "with a note unless --method-config gives their fitted file, e.g. "
               "--method-config '{\"minference\": {\"path\": \"plan.json\"}, \"moa\": {\"plan_path\": \"moa.json\"}}'.")
    p.add_argument("--model", default=None,
                   help="local Hugging Face model folder (default: the bundled model), or a Hub name "
                        "(owner/name) with --allow-download")
    p.add_argument("--allow-download", action="store_true",
                   help="allow downloading --model from the Hugging Face Hub (off by default: offline)")
    p.add_argument("--device-map", default=None,
                   help="from_pretrained device map instead of --device, e.g. 'auto' (needs accelerate)")
    p.add_argument("--dtype", default=None, help="weight dtype, e.g. bfloat16 (default: float32 on the CPU, "
                                                  "the saved dtype elsewhere)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap each prompt as a user turn of the tokenizer's chat template (error when it has none)")
    p.add_argument("--methods", default="dense,a_shape,vertical_slash",
                   help="comma-separated registered method names (see `sparsattn list`); dense = unpatched model")
    p.add_argument("--tasks", default="passkey", help="comma-separated task names")
    p.add_argument("--lengths", default="2048,4096", help="comma-separated prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=4, help="samples per task x length (x depth with --depths)")
    p.add_argument("--depths", default=None, help="comma-separated needle depths in [0,1] (default: sweep)")
    p.add_argument("--out", default="sparsattn_eval", help="output folder (eval.csv, PNGs)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=12, help="greedy tokens per answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fidelity", action="store_true", help="skip the fidelity metrics")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--method-config", default=None,
                   help="JSON {method: {hyper-parameter: value}} (or a path to such a JSON file); also how "
                        "fitted files are given to methods that need fitting")
    return p


def _check_cli_paths(out: str, device: str) -> None:
    """Refuse (ValueError naming the option) an ``--out`` that is a file and a ``--device`` that is not
    a torch device or not available here, before the model is loaded."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out: expected a folder for eval.csv and the PNGs, {out!r} is a file")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} asked for, but CUDA is not available here (use --device cpu)")


def main(argv=None) -> int:
    """main: ``sparsattn eval`` (see ``--help``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = parse_method_config(args.method_config)
        try:
            lengths = [int(x) for x in _csv_list(args.lengths)]
            depths = None if args.depths is None else [float(x) for x in _csv_list(args.depths)]
        except ValueError as e:
            raise ValueError(f"--lengths/--depths: expected comma-separated numbers ({e})") from None
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        _check_cli_paths(args.out, device)
        run_eval(args.model, methods=_csv_list(args.methods), tasks=_csv_list(args.tasks), lengths=lengths,
                 n_samples=args.samples, depths=depths, method_config=cfg, out_dir=args.out, device=device,
                 batch_size=args.batch_size, progress=not args.no_progress, fidelity=not args.no_fidelity,
                 seed=args.seed, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                 allow_download=args.allow_download, device_map=args.device_map, chat_template=args.chat_template)
    except ValueError as e:  # ModelPathError / BundledModelMissing are ValueErrors too
        print(f"sparsattn eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
