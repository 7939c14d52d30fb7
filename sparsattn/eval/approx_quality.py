"""approx_quality: attention approximations (HyperAttention, Scatterbrain and each of its parts, SEA)
on the bundled model's own q/k/v, and HyperAttention swapped into the model's last layers.

Two measurements (``run``; CLI ``scripts/approx_quality.py --out DIR --length 4096 --device cpu``):

1. **fidelity** (``fidelity_rows`` over ``method_grid``: the ``fidelity_grid`` entries of the registered
   layers, each approximation's budgets in its own file): q/k/v of every layer captured on a held-out
   source-code prompt of ``length`` tokens (``capture_qkv``; GQA heads repeated). Per layer, method and configuration:
   relative output error ``||o - o_exact||_F / ||o_exact||_F`` over all heads and rows, the mean
   absolute lse error, and the **attention recall**: the share of the exact softmax mass that falls
   on the pairs the method computes exactly, ``exp(lse_exact_part - lse_exact)`` averaged over rows
   and heads (HyperAttention: leaves + sorted diagonal blocks, without the sampled residual;
   Scatterbrain / LSH: the clusters; SEA: the selected blocks; Combiner: the directly attended pairs,
   ``combiner_direct_mask``; Performer alone: none, empty).
   The ``-window`` (Hyper, Scatterbrain) and ``-previous`` (SEA) rows are the causal-safe
   selections the causal layers use (their module docstrings); the others are the papers' rules.
   Compute is counted per query: ``pairs`` = exact q-k dot products, ``lowrank`` = the low-rank /
   estimator work in key-pair equivalents (``m`` features with value width ``w`` cost ``m * w / D``
   keys); methods are compared at matched ``pairs + lowrank`` (a grid of budgets per method).
2. **swap** (``swap_rows``): each method declaring ``swap_configs`` (``hyper``, ``scatterbrain``) patched
   into the last 2 and last 4 layers of the model
   (``sparsattn.patch``): passkey accuracy decided by one prefill forward (teacher forcing,
   ``prefill_quality.teacher_forced_predict``; ``x/N``), held-out perplexity at ``length`` and the
   prefill time of one forward, all against the same model patched with ``dense`` everywhere.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["method_grid", "fidelity_rows", "swap_rows", "summarize", "plot", "replot", "run", "main", "swap_settings"]

def swap_settings() -> dict:
    """swap_settings: ``{label: (method, config)}`` of every registered prefill method that declares
    ``swap_configs`` (the approximations that compute their own output), read from the registry."""
    from ..methods import list_methods, method_class
    from ..methods.base import declares

    out = {}
    for name in list_methods("prefill"):
        cls = method_class(name)
        if declares(cls, "swap_configs"):
            for label, cfg in cls.swap_configs().items():
                out[label] = (name, dict(cfg))
    return out


def _log(msg: str) -> None:
    print(f"[approx_quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def method_grid(D: int, seed: int = 0) -> list[dict]:
    """The (method, config) grid, read from the layer registry: the entries of every layer class in
    ``sparsattn.nn.list_layers()`` (registry order) that declares the ``fidelity_grid(D, seed)`` hook
    (the approximations; each keeps its budgets in its own file). Each entry has ``method``,
    ``config`` (str), ``run(q, k, v, stats)`` -> ``(out, lse)`` and ``exact_part(q, k, v)`` -> lse of
    the exactly computed pairs (or None). ValueError when two entries share ``(method, config)``."""
    from ..nn import layer_class, list_layers

    grid: list[dict] = []
    owner: dict = {}
    for name in list_layers():
        hook = getattr(layer_class(name), "fidelity_grid", None)
        if not callable(hook):
            continue
        for g in hook(D, seed):
            missing = {"method", "config", "run", "exact_part"} - set(g)
            if missing:
                raise ValueError(f"{name}.fidelity_grid: entry without {sorted(missing)}: {g!r}")
            key = (g["method"], g["config"])
            if key in owner:
                raise ValueError(f"{name}.fidelity_grid: entry {key} already given by layer {owner[key]!r}")
            owner[key] = name
            grid.append(g)
    return grid


def _exact(q, k, v, scale):
    from ..nn.mixers._approx_common import exact_lse

    outs, lses = [], []
    for h in range(q.shape[1]):  # one head at a time: O(T^2) memory per head
        o, l = exact_lse(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], scale=scale, causal=True)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, 1)


def fidelity_rows(layers: dict, scales: dict, grid: list[dict], *, heads: Optional[list] = None,
                  log: Callable = _log) -> list[dict]:
    """One row per (layer, method, config): ``rel_err``, ``lse_err``, ``recall``, ``pairs_per_query``,
    ``lowrank_per_query``, ``compute_per_query`` (their sum), ``compute_frac`` (over the mean causal
    pairs per query, ``(T + 1) / 2``), ``seconds``. ``layers``: ``{layer: (q, k, v)}``
    (k/v may have fewer heads: repeated); ``heads``: the query heads evaluated (default all)."""
    from ..nn.base import attention_backend
    from ..nn.mixers._approx_common import repeat_kv

    rows = []
    for layer in sorted(layers):
        q, k, v = layers[layer][:3]
        q = q.float()
        k, v = repeat_kv(k.float(), q.shape[1]), repeat_kv(v.float(), q.shape[1])
        if heads is not None:
            q, k, v = q[:, heads], k[:, heads], v[:, heads]
        scale = scales.get(layer, q.shape[-1] ** -0.5)
        B, H, T, D = q.shape
        o_ex, l_ex = _exact(q, k, v, scale)
        for g in grid:
            t0 = time.perf_counter()
            st: dict = {}
            with torch.no_grad(), attention_backend("reference" if q.device.type == "cpu" else None):
                o, l = g["run"](q, k, v, st)
                part = g["exact_part"](q, k, v) if g["exact_part"] is not None else None
            dt = time.perf_counter() - t0
            n = B * H * T
            recall = float(torch.exp((part - l_ex).clamp(max=0)).mean()) if part is not None else float("nan")
            comp = (st.get("pairs", 0.0) + st.get("lowrank", 0.0)) / n
            rows.append({
                "layer": layer, "heads": "all" if heads is None else ",".join(map(str, heads)), "method": g["method"], "config": g["config"], "T": T,
                "rel_err": float((o.float() - o_ex).norm() / o_ex.norm()),
                "lse_err": float((l.float() - l_ex).abs().mean()), "recall": recall,
                "pairs_per_query": st.get("pairs", 0.0) / n, "lowrank_per_query": st.get("lowrank", 0.0) / n,
                "compute_per_query": comp, "compute_frac": comp / ((T + 1) / 2), "seconds": dt,
            })
            log(f"layer {layer} {g['method']:<22} {g['config']:<34} rel_err {rows[-1]['rel_err']:.3f} "
                f"recall {recall:.3f} compute/query {comp:7.1f} ({dt:.1f}s)")
    return rows


def _passkey(model, tok, length: int, n: int, device) -> tuple[int, int]:
    from .prefill_quality import ANSWER_MARGIN, score_teacher_forced, teacher_forced_ids, teacher_forced_predict
    from .tasks import make_samples

    ok = 0
    samples = make_samples("passkey", tok, length - ANSWER_MARGIN, n, seed=0, progress=False, haystack="noise")
    for s in samples:
        p, a = teacher_forced_ids(tok, s.prompt, s.answers[0])
        ok += int(score_teacher_forced(teacher_forced_predict(model, p, a, device), a)["correct"])
    return ok, len(samples)


def _prefill_seconds(model, ids, repeats: int = 3) -> float:
    ts = []
    with torch.no_grad():
        for _ in range(repeats):
            if ids.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            if ids.is_cuda:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def swap_rows(model, tok, length: int, *, n_passkey: int = 10, layer_counts=(2, 4), configs: Optional[dict] = None,
              ppl_windows: int = 2, repeats: int = 3, backend: Optional[str] = None,
              log: Callable = _log) -> list[dict]:
    """Each approximation (``configs``: ``{label: (method, config)}``, default ``swap_settings()``, the
    registry's ``swap_configs`` presets) in the last ``layer_counts`` layers vs ``dense`` everywhere (same
    patched path): one row per setting with ``method``, ``swap_layers`` (also ``hyper_layers``, the old
    column), ``passkey`` (x), ``n`` (N), ``ppl``, ``ppl_change`` (relative to dense), ``prefill_s`` and
    ``speedup`` (dense time / time)."""
    from ..integrations import hf
    from ..integrations.hf import attention_modules
    from ..methods import get_method
    from .perplexity import heldout_token_stream, perplexity

    dev = next(model.parameters()).device
    configs = swap_settings() if configs is None else configs
    layers = sorted(attention_modules(model))
    stream = heldout_token_stream(tok, length * ppl_windows, seed=1000)
    ids = stream[:length][None].to(dev)
    settings = [("dense", "dense", 0, "dense")]
    for label, (method, cfg) in configs.items():
        for c in layer_counts:
            settings.append((label, method, c, {l: get_method(method, **cfg) for l in layers[-c:]}))
    rows = []
    for name, method, c, spec in settings:
        t0 = time.perf_counter()
        with hf.patched(model, method=spec, backend=backend):
            ok, n = _passkey(model, tok, length, n_passkey, dev)
            ppl = perplexity(model, stream, lengths=(length,), progress=False)[length].ppl
            secs = _prefill_seconds(model, ids, repeats)
        rows.append({"setting": name, "method": method, "swap_layers": c, "hyper_layers": c, "layers": ",".join(map(str, layers[-c:])) if c else "",
                     "passkey": ok, "n": n, "passkey_acc": ok / max(n, 1), "ppl": ppl, "prefill_s": secs,
                     "length": length})
        log(f"{name:<20} last {c} layers: passkey {ok}/{n}, ppl {ppl:.3f}, prefill {secs:.2f}s "
            f"({time.perf_counter() - t0:.0f}s)")
    base = rows[0]
    for r in rows:
        r["ppl_change"] = r["ppl"] / base["ppl"] - 1.0
        r["speedup"] = base["prefill_s"] / r["prefill_s"]
    return rows


def summarize(fid: list[dict]) -> list[dict]:
    """Per (method, config): medians over layers of every metric, and the worst layer's rel_err."""
    out = []
    for key in dict.fromkeys((r["method"], r["config"]) for r in fid):
        rs = [r for r in fid if (r["method"], r["config"]) == key]
        row = {"method": key[0], "config": key[1], "layers": len(rs), "T": rs[0]["T"]}
        for m in ("rel_err", "lse_err", "recall", "pairs_per_query", "lowrank_per_query", "compute_per_query",
                  "compute_frac"):
            row[m] = statistics.median(float(r[m]) for r in rs)
        row["rel_err_max"] = max(float(r["rel_err"]) for r in rs)
        out.append(row)
    return out


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v) if k not in ("method", "config", "heads") else v
            except ValueError:
                pass
    return rows


def plot(fid: list[dict], path: Path) -> None:
    """Relative output error and attention recall vs compute per query (median over layers), one
    line per method."""
    from ._harness import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({r["method"] for r in fid})
    colors = dict(zip(methods, plt.get_cmap("tab10").colors))
    for m in methods:
        cfgs = []
        for c in dict.fromkeys(r["config"] for r in fid if r["method"] == m):
            rs = [r for r in fid if r["method"] == m and r["config"] == c]
            cfgs.append((statistics.median(r["compute_frac"] for r in rs), statistics.median(r["rel_err"] for r in rs),
                         statistics.median(r["recall"] for r in rs)))
        cfgs.sort()
        x = [c[0] for c in cfgs]
        axes[0].plot(x, [c[1] for c in cfgs], "o-", label=m, color=colors[m])
        if not all(math.isnan(c[2]) for c in cfgs):
            axes[1].plot(x, [c[2] for c in cfgs], "o-", label=m, color=colors[m])
    T = int(fid[0]["T"]) if fid else 0
    for ax, yl in zip(axes, ("relative output error (median over layers)", "attention recall (median over layers)")):
        ax.set_xscale("log")
        ax.set_xlabel(f"compute per query / mean causal pairs per query (T={T})")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    heads = fid[0].get("heads", "all") if fid else "all"
    fig.suptitle(f"Approximations on the bundled model's q/k/v (every layer, query heads {heads})")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def run(out_dir, *, length: int = 4096, device: str = "cpu", n_passkey: int = 10, parts=("fidelity", "swap"),
        layers: Optional[list] = None, heads: Optional[list] = None, layer_counts=(2, 4),
        swap_configs: Optional[list] = None, ppl_windows: int = 2, repeats: int = 3) -> dict:
    """Both measurements on the bundled model; CSVs (``approx_fidelity.csv``, ``approx_swap.csv``) and
    ``approx_fidelity.png`` under ``out_dir``. Returns ``{"fidelity": rows, "swap": rows}``."""
    from ..bench.common import write_csv
    from ..capture import capture_qkv
    from ..integrations.hf import attention_modules
    from ..models import load_bundled
    from .perplexity import heldout_token_stream

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, tok = load_bundled(device, dtype=dtype)
    res: dict = {}
    if "fidelity" in parts:
        ids = heldout_token_stream(tok, length, seed=1000)[None].to(device)
        cap = capture_qkv(model, ids, layers)
        mods = attention_modules(model)
        scales = {l: float(mods[l].scaling) for l in cap}
        D = next(iter(cap.values()))[0].shape[-1]
        res["fidelity"] = fidelity_rows(cap, scales, method_grid(D), heads=heads)
        write_csv(res["fidelity"], out / "approx_fidelity.csv")
        replot(out)
    if "swap" in parts:
        every = swap_settings()
        unknown = [k for k in (swap_configs or ()) if k not in every]
        if unknown:
            raise ValueError(f"swap_configs: unknown {unknown}; expected labels of {sorted(every)}")
        cfgs = None if swap_configs is None else {k: every[k] for k in swap_configs}
        res["swap"] = swap_rows(model, tok, length, n_passkey=n_passkey, layer_counts=layer_counts, configs=cfgs,
                                ppl_windows=ppl_windows, repeats=repeats,
                                backend="reference" if device == "cpu" else None)
        write_csv(res["swap"], out / "approx_swap.csv")
    return res


def replot(out_dir) -> list[dict]:
    """From ``approx_fidelity.csv`` in ``out_dir``: the summary CSV and the PNG (no recomputation)."""
    from ..bench.common import write_csv

    out = Path(out_dir)
    fid = _read_csv(out / "approx_fidelity.csv")
    summary = summarize(fid)
    write_csv(summary, out / "approx_fidelity_summary.csv")
    plot(fid, out / "approx_fidelity.png")
    return summary


def main(argv=None) -> int:
    """CLI: ``--out DIR --length N --device cpu|cuda --n-passkey N --parts fidelity,swap`` (and
    ``--layers``, ``--heads``, ``--swap-layers``, ``--swap-configs``, ``--ppl-windows``, ``--repeats``)."""
    ap = argparse.ArgumentParser(prog="scripts/approx_quality.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (CSV + PNG)")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-passkey", type=int, default=10)
    ap.add_argument("--parts", default="fidelity,swap", help="comma list of fidelity, swap")
    ap.add_argument("--layers", default=None, help="comma list of layers for the fidelity part (default all)")
    ap.add_argument("--heads", default=None, help="comma list of query heads for the fidelity part (default all)")
    ap.add_argument("--swap-layers", default="2,4", help="comma list: each approximation in the last N layers")
    ap.add_argument("--swap-configs", default=None,
                    help="comma list of swap labels (the methods' swap_configs presets; default all)")
    ap.add_argument("--ppl-windows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed prefill forwards (median)")
    ap.add_argument("--replot", action="store_true", help="only redo the summary and plot from the CSV in --out")
    a = ap.parse_args(argv)
    if a.replot:
        replot(a.out)
        return 0
    parts = tuple(p for p in a.parts.split(",") if p)
    bad = [p for p in parts if p not in ("fidelity", "swap")]
    if bad or a.length < 2 or a.n_passkey < 1:
        raise ValueError(f"--parts/--length/--n-passkey: expected parts in fidelity,swap, length >= 2, n >= 1; "
                         f"got {a.parts!r}, {a.length}, {a.n_passkey}")
    ints = lambda t: [int(x) for x in t.split(",")] if t else None  # noqa: E731
    run(a.out, length=a.length, device=a.device, n_passkey=a.n_passkey, parts=parts, layers=ints(a.layers),
        heads=ints(a.heads), layer_counts=tuple(ints(a.swap_layers)),
        swap_configs=a.swap_configs.split(",") if a.swap_configs else None, ppl_windows=a.ppl_windows,
        repeats=a.repeats)
    return 0
