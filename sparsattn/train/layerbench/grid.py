"""Grids of layer x task x length x width runs into ONE CSV (resumable) and its plots.

``run_grid("reduced", out="layers_grid/results.csv")`` runs every row not already in the CSV
(same layer, task, seq_len, width, layers, seed and no error), appending as it goes, and stops
starting new runs after ``max_minutes`` (so a GPU sweep runs in chunks under the device's
10-minute limit: call again, it resumes). ``plot_grid(csv)`` draws accuracy vs width per layer
and accuracy vs compute (attention FLOPs), one panel per (task, seq_len).
"""
from __future__ import annotations

import csv
import json
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from ...bench.common import write_csv
from ...nn import layer_class, list_layers
from .loop import COLUMNS, train_layer

#: the grids. "reduced": the CPU grid of issue 12 (short MQAR with a 512-token vocabulary, small
#: ListOps, Pathfinder on 16x16 images); "full": issue 18's GPU sweep (Zoology MQAR at 256 / 512,
#: widths 64..512, V = 8192; LRA-size ListOps and Pathfinder-32).
GRIDS = {
    "reduced": [
        dict(task="mqar", seq_lens=[64, 128], widths=[64, 128], steps=2000, kw=dict(vocab=512)),
        dict(task="listops", seq_lens=[128], widths=[64], steps=1500, kw=dict(n_train=20000)),
        # Pathfinder on 16x16 images (256 tokens; the generator's SIZE_PRESETS[16]): a 32x32 image
        # costs 13 s per step for dense attention on one CPU core, a 16x16 one 0.6 s
        dict(task="pathfinder", seq_lens=[256], widths=[64], steps=2000, kw=dict(n_train=64000, eval_every=250)),
    ],
    "full": [
        dict(task="mqar", seq_lens=[256, 512], widths=[64, 128, 256, 512], steps=20000,
             kw=dict(eval_every=500)),
        dict(task="listops", seq_lens=[2000], widths=[512], steps=5000,
             kw=dict(n_layers=6, heads=8, n_train=96000, lr=5e-4)),
        dict(task="pathfinder", seq_lens=[1024], widths=[128], steps=20000,
             kw=dict(n_layers=4, heads=8, batch_size=64, n_train=160000, eval_every=2000)),
    ],
}
EXTRA_COLUMNS = ["error"]
KEY = ("layer", "task", "seq_len", "width", "layers", "seed")


def default_layers(task: str) -> list[str]:
    """default_layers: every registered layer that can run ``task``: causal for MQAR, 1-D for MQAR
    and ListOps (a 2-D layer runs them only through its ``presets[task]``, e.g. its 1-D form;
    2-D layers run Pathfinder as images)."""
    out = []
    for name in list_layers():
        cls = layer_class(name)
        if task == "mqar" and True not in tuple(getattr(cls, "causal_modes", (True,))):
            continue
        if task in ("mqar", "listops") and getattr(cls, "layout", "1d") == "2d" and task not in getattr(cls, "presets", {}):
            continue
        out.append(name)
    return out


def read_rows(path: Path) -> list[dict]:
    """The rows of a result CSV (empty list when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _key(row: dict) -> tuple:
    return tuple(str(row.get(k)) for k in KEY)


def plan(grid: str, *, layers: Optional[Sequence[str]] = None, tasks: Optional[Sequence[str]] = None,
         hybrids: Sequence[Sequence[str]] = (), seeds: Sequence[int] = (0,), seq_lens: Optional[Sequence[int]] = None,
         widths: Optional[Sequence[int]] = None) -> list[dict]:
    """plan: the runs of ``grid`` as keyword dicts for ``train_layer`` (``layers``/``tasks``/``seq_lens``/
    ``widths`` filter; ``hybrids`` adds models mixing layers per block, e.g. ``[["baseconv", "dense"]]``)."""
    if grid not in GRIDS:
        raise ValueError(f"grid: expected one of {sorted(GRIDS)}, got {grid!r}")
    runs = []
    for spec in GRIDS[grid]:
        task = spec["task"]
        if tasks is not None and task not in tasks:
            continue
        names = default_layers(task)
        if layers is not None:
            bad = [n for n in layers if n not in list_layers()]
            if bad:
                raise ValueError(f"layers: unknown layer(s) {bad}; registered: {list_layers()}")
            names = [n for n in layers if n in names]
        models: list = list(names) + [list(h) for h in hybrids]
        for seq_len in [t for t in spec["seq_lens"] if seq_lens is None or t in seq_lens]:
            for width in [w for w in spec["widths"] if widths is None or w in widths]:
                for m in models:
                    for seed in seeds:
                        runs.append(dict(layer=m, task=task, seq_len=seq_len, width=width, steps=spec["steps"],
                                         seed=seed, **spec.get("kw", {})))
    return runs


def _run_key(run: dict) -> tuple:
    from .loop import TASK_DEFAULTS, _label

    m = run["layer"]
    n_layers = run.get("n_layers", TASK_DEFAULTS[run["task"]]["n_layers"]) if isinstance(m, str) else len(m)
    label = m if isinstance(m, str) else _label(m)
    return tuple(str(v) for v in (label, run["task"], run["seq_len"], run["width"], n_layers, run["seed"]))


def run_grid(grid: str, out: Path, *, layers=None, tasks=None, hybrids=(), seeds=(0,), device: str = "cpu",
             max_minutes: Optional[float] = None, shard: tuple = (0, 1), progress: bool = True,
             plot: bool = True, seq_lens=None, widths=None) -> list[dict]:
    """run_grid: run the rows of ``plan(...)`` missing from the CSV ``out``, appending each result.

    ``max_minutes``: no new run starts once the elapsed time plus the longest run so far would
    pass it (then call again: the CSV is the state), and a run's training stops at 85% of the time
    left (its row then has ``steps_done < steps``; it is not run again). ``shard=(i, n)``: only runs ``i, i+n, ...``
    (one process per GPU). A run that raises is written with its ``error`` and retried next time.
    Returns the rows run in this call.
    """
    out = Path(out)
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise ValueError(f"shard: expected (i, n) with 0 <= i < n, got {shard!r}")
    todo = plan(grid, layers=layers, tasks=tasks, hybrids=hybrids, seeds=seeds, seq_lens=seq_lens,
                widths=widths)[i::n]
    rows = read_rows(out)
    have = {_key(r) for r in rows if not r.get("error")}
    todo = [r for r in todo if _run_key(r) not in have]
    print(f"grid {grid}: {len(todo)} run(s) to do -> {out}", flush=True)
    t0, longest, new = time.perf_counter(), 0.0, []
    for k, run in enumerate(todo):
        if max_minutes is not None and (time.perf_counter() - t0 + 1.2 * longest) > 60 * max_minutes:
            print(f"stopping after {k} run(s): the time budget of {max_minutes} min would be passed; "
                  f"{len(todo) - k} left (run again to resume)", flush=True)
            break
        ts = time.perf_counter()
        kw = dict(run)
        if max_minutes is not None:  # training stops in time to evaluate inside the budget
            kw["time_limit_s"] = max(10.0, 0.85 * (60 * max_minutes - (ts - t0)))
        try:
            row = train_layer(kw.pop("layer"), kw.pop("task"), device=device, progress=progress, **kw)
            row["error"] = ""
        except Exception as e:  # recorded, retried on the next call
            traceback.print_exc()
            m = run["layer"]
            row = {"layer": m if isinstance(m, str) else "+".join(m), "task": run["task"], "seq_len": run["seq_len"],
                   "width": run["width"], "seed": run["seed"], "steps": run["steps"],
                   "layers": _run_key(run)[4], "error": f"{type(e).__name__}: {e}"[:300]}
        longest = max(longest, time.perf_counter() - ts)
        rows = [r for r in read_rows(out) if _key(r) != _key(row)] + [row]
        write_csv(rows, out, COLUMNS + EXTRA_COLUMNS)
        new.append(row)
        print(f"  {row['layer']:>14s} {row['task']} T={row['seq_len']} d={row['width']}: "
              f"acc={row.get('accuracy')} density={row.get('density')} ({row.get('train_s')} s) {row['error']}",
              flush=True)
    if plot and read_rows(out):
        plot_grid(out)
    return new


def _num(v) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_grid(csv_path: Path, out_dir: Optional[Path] = None) -> list[Path]:
    """plot_grid: ``accuracy_vs_width.png`` (per layer, one panel per task and length),
    ``accuracy_vs_compute.png`` (accuracy against attention FLOPs per sequence, log scale) and, for
    rows whose ``curve`` has two or more evaluations, ``accuracy_vs_step.png`` (held-out accuracy
    during training, one line per run) next to the CSV (or in ``out_dir``). Rows with an error are
    left out; several rows of one layer at one x (seeds) are drawn as their mean with a min-max bar.
    Raises ValueError when a ``curve`` field is not a JSON list of ``[step, accuracy]`` pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    csv_path = Path(csv_path)
    out_dir = Path(out_dir) if out_dir is not None else csv_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_rows(csv_path) if not r.get("error") and _num(r.get("accuracy")) is not None]
    panels = sorted({(r["task"], int(r["seq_len"])) for r in rows})
    # one colour and marker per layer in every panel, one legend for the figure
    names = sorted({r["layer"] for r in rows}, key=lambda n: (n != "dense", n))
    cmap = plt.get_cmap("tab20")
    styles = {n: (dict(lw=2.5, color="black", marker="o") if n == "dense" else
                  dict(lw=1.2, color=cmap(i % 20), marker="osD^v<>"[i % 7])) for i, n in enumerate(names)}
    paths = []
    for fname, xkey, xlabel, logx in (("accuracy_vs_width.png", "width", "model width", True),
                                      ("accuracy_vs_compute.png", "flops", "attention FLOPs per sequence", True)):
        if not panels:
            break
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
        for ax, (task, T) in zip(axes[0], panels):
            sub = [r for r in rows if r["task"] == task and int(r["seq_len"]) == T]
            for name in names:
                by_x: dict = {}  # several seeds (or learning rates) at one x: their mean, min-max as a bar
                for r in sub:
                    if r["layer"] == name and _num(r[xkey]) is not None and _num(r[xkey]) > 0:
                        by_x.setdefault(_num(r[xkey]), []).append(_num(r["accuracy"]))
                if by_x:
                    xs = sorted(by_x)
                    mean = [sum(by_x[x]) / len(by_x[x]) for x in xs]
                    ax.plot(xs, mean, ms=5, label=name, **styles[name])
                    spread = [(x, m, min(by_x[x]), max(by_x[x])) for x, m in zip(xs, mean) if len(by_x[x]) > 1]
                    if spread:
                        ax.errorbar([t[0] for t in spread], [t[1] for t in spread],
                                    yerr=[[t[1] - t[2] for t in spread], [t[3] - t[1] for t in spread]],
                                    fmt="none", ecolor=styles[name]["color"], elinewidth=1, capsize=3)
            ax.set_title(f"{task}, T={T}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy")
            if logx:
                ax.set_xscale("log", base=2 if xkey == "width" else 10)
                if xkey != "width":  # labels at 1, 2, 5 x 10^k as "2M", "5M": readable on a narrow span
                    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                    ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded minor labels
            ax.grid(alpha=0.3)
        paths.append(_save(fig, axes[0], names, out_dir / fname))
    curves = [(r, c) for r, c in ((r, _curve(r, csv_path)) for r in rows if r.get("curve")) if len(c) >= 2]
    curve_panels = [pn for pn in panels if any((r["task"], int(r["seq_len"])) == pn for r, _ in curves)]
    if curve_panels:  # the periodic evaluations: was a run still rising when it stopped?
        fig, axes = plt.subplots(1, len(curve_panels), figsize=(4.6 * len(curve_panels), 3.8), squeeze=False)
        for ax, (task, T) in zip(axes[0], curve_panels):
            for r, pts in curves:
                if (r["task"], int(r["seq_len"])) == (task, T):
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], ms=3, label=r["layer"], **styles[r["layer"]])
            ax.set_title(f"{task}, T={T}")
            ax.set_xlabel("training step")
            ax.set_ylabel("held-out accuracy")
            ax.grid(alpha=0.3)
        paths.append(_save(fig, axes[0], names, out_dir / "accuracy_vs_step.png"))
    return paths


def _curve(row: dict, csv_path: Path) -> list:
    """A row's ``curve`` field as ``[[step, accuracy], ...]`` (ValueError naming the file and field)."""
    try:
        pts = json.loads(row["curve"])
        return [(float(a), float(b)) for a, b in pts]
    except (ValueError, TypeError) as e:
        raise ValueError(f"{csv_path}: field 'curve' of the {row.get('layer')!r} row is not a JSON list of "
                         f"[step, accuracy] pairs ({e})") from None


def _save(fig, axes, names, path: Path) -> Path:
    """One legend (a layer once, in ``names`` order) to the right of the panels, then save and close."""
    import matplotlib.pyplot as plt

    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend([handles[n] for n in names if n in handles], [n for n in names if n in handles], fontsize=7,
               loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def markdown_tables(csv_paths: Sequence[Path]) -> str:
    """markdown_tables: one table per (task, seq_len) of the result CSVs: per layer and width the
    accuracy, the difference to dense at the same width, density, train density, steps run and train
    seconds (rows with an error show it)."""
    rows = [r for p in csv_paths for r in read_rows(p)]
    out = []
    for task, T in sorted({(r["task"], int(r["seq_len"])) for r in rows}):
        sub = [r for r in rows if r["task"] == task and int(r["seq_len"]) == T]
        dense = {r["width"]: _num(r["accuracy"]) for r in sub if r["layer"] == "dense" and not r.get("error")}
        out.append(f"\n**{task}, T = {T}**\n")
        out.append("| layer | width | accuracy | vs dense | density | train density | steps run | train s |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in sorted(sub, key=lambda r: (r["layer"] != "dense", r["layer"], int(r["width"]))):
            if r.get("error"):
                out.append(f"| {r['layer']} | {r['width']} | error: {r['error'][:80]} | | | | | |")
                continue
            acc, ref = _num(r["accuracy"]), dense.get(r["width"])
            diff = "" if ref is None or r["layer"] == "dense" else f"{acc - ref:+.4f}"
            out.append(f"| {r['layer']} | {r['width']} | {acc:.4f} | {diff} | {r['density']} | {r['train_density']} | "
                       f"{r['steps_done']} / {r['steps']} | {r['train_s']} |")
    return "\n".join(out) + "\n"
