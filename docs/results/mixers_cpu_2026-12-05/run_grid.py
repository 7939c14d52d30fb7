"""Reduced CPU grid of Zoology's recall comparison for the recurrent mixers (issue 13).

MQAR (our generator, ``sparsattn.eval.mqar``; K = 4 at T = 64, K = 8 at T = 128; vocabulary 512)
for dense attention, baseconv (long implicit filter), lightning, aaren, jrt (JRT-RNN, prefix =
the 2K key-value tokens) and the Zoology hybrid baseconv (short) + dense attention, at widths 64
and 128, 2 blocks without MLP (the harness's MQAR defaults), through the shared harness
(``sparsattn.train.layerbench.train_layer``). Two JRT-Prompt runs (the context read twice) follow
for lightning and baseconv. Resumable: rows already in results.csv are skipped.

    OMP_NUM_THREADS=1 python docs/results/mixers_cpu_2026-12-05/run_grid.py [--lr 6e-3] [--lengths 64 128]
    python docs/results/mixers_cpu_2026-12-05/run_grid.py --combine   # best rate per model -> best.csv + plots

Each learning rate has its own CSV (results_lr{lr}.csv); ``--combine`` keeps, per (model, length,
width), the row of the best accuracy (Zoology reports the best of its learning-rate sweep).

The full GPU grid (T = 256 / 512, widths 64..512, V = 8192) is the harness's ``full`` grid:
``sparsattn train-layer --grid full --tasks mqar --layers dense baseconv lightning aaren jrt
--hybrids baseconv,dense baseconv,lightning baseconv,jrt baseconv,aaren --device cuda --max-minutes 9``.
"""
import argparse
import json
import traceback
from pathlib import Path

import torch

from sparsattn.bench.common import write_csv
from sparsattn.nn.mixers.jrt import jrt_prompt
from sparsattn.train.layerbench import COLUMNS, TaskData, make_task, plot_grid, train_layer
from sparsattn.train.layerbench.grid import read_rows

HERE = Path(__file__).resolve().parent
VOCAB = 512
STEPS = {64: 1000, 128: 800}
BATCH = 32
LR = 6e-3  # default rate (Zoology sweeps 1e-4..1e-2 per model; we run at most two rates on the CPU)
MODELS = ["dense", "baseconv", "lightning", "aaren", "jrt", ["baseconv", "dense"],
          # the approximations (tenth session): at T = 64 their mqar presets compute every pair
          # (hyper, sea) or more (scatterbrain: sparse + low rank), so these rows test training
          # through the layer, not the approximation (that is the GPU's T = 256 width curve)
          "hyper", "scatterbrain", "sea"]


def label(m):
    return m if isinstance(m, str) else "+".join(m)


def runs(lengths=(64, 128), plain: bool = True, widths=(64, 128), prompts: bool = True):
    out = []
    for T in (lengths if plain else ()):
        for W in widths:
            for m in MODELS:
                out.append(dict(model=m, T=T, W=W, prompt=False))
    for m in (("lightning", "baseconv") if prompts else ()):
        for W in (64, 128):
            if 64 in lengths:
                out.append(dict(model=m, T=64, W=W, prompt=True))
    return out


def prompted(T: int) -> TaskData:
    """MQAR of length T with its 2K context tokens read twice (JRT-Prompt): length T + 2K."""
    d = make_task("mqar", T, n_train=STEPS[T] * BATCH, n_test=1000, seed=0, vocab=VOCAB)
    ctx = d.prefix_len
    xtr, ytr = jrt_prompt(d.x_train, d.y_train, ctx)
    xte, yte = jrt_prompt(d.x_test, d.y_test, ctx)
    return TaskData("mqar", xtr, ytr, xte, yte, d.vocab, d.n_out, "lm", True, T + ctx,
                    info=d.info + ", JRT-Prompt (context twice)", prefix_len=None)


def csv_for(lr: float) -> Path:
    """The result CSV of one learning rate (the first grid, at 6e-3, wrote results.csv)."""
    return HERE / ("results.csv" if lr == 6e-3 else f"results_lr{lr:g}.csv")


def recost(r: dict) -> dict:
    """density / flops of a row recomputed from its block configs with the layers' current
    ``cost`` (the first grid process ran with an older baseconv cost that counted its projection),
    at the length the model really saw (T + 2K with JRT-Prompt)."""
    from sparsattn.nn import get_layer
    from sparsattn.train.layerbench.tasks import mqar_pairs

    prompt = r["layer"].endswith(" (JRT-Prompt)")
    names = r["layer"].replace(" (JRT-Prompt)", "").split("+")
    cfgs = json.loads(r["config"])
    names = names * len(cfgs) if len(names) == 1 else names
    T = int(r["seq_len"]) + (2 * mqar_pairs(int(r["seq_len"])) if prompt else 0)
    costs = []
    for n, c in zip(names, cfgs):
        c = dict(c)
        costs.append(get_layer(n, c.pop("dim"), c.pop("heads"), **c).cost(T))
    return {"density": round(sum(c["density"] for c in costs) / len(costs), 4),
            "train_density": round(sum(c["density"] for c in costs) / len(costs), 4),
            "flops": sum(c["flops"] for c in costs)}


def combine() -> Path:
    """best.csv: per (model, length, width) the error-free row of the highest accuracy over the
    rates' CSVs and extra_runs.csv (lengths with a single model left out); then the harness's
    plots of it."""
    best = {}
    # extra_runs.csv (the conv + mixer pairs) has the grid's protocol; long_runs.csv (3000 steps) not
    for p in sorted(HERE.glob("results*.csv")) + [HERE / "extra_runs.csv"]:
        for r in read_rows(p):
            if r.get("error") or r.get("accuracy") in (None, ""):
                continue
            k = (r["layer"], r["seq_len"], r["width"])
            if k not in best or float(r["accuracy"]) > float(best[k]["accuracy"]):
                best[k] = r
    # a length where only one model finished (T=128: dense alone, the CPU time ran out) stays in
    # the per-rate CSVs but not in the comparison
    models_at = {}
    for (m, T, _w) in best:
        models_at.setdefault(T, set()).add(m)
    best = {k: r for k, r in best.items() if len(models_at[k[1]]) > 1}
    for r in best.values():
        r.update(recost(r))
    out = HERE / "best.csv"
    write_csv(sorted(best.values(), key=lambda r: (int(r["seq_len"]), r["layer"], int(r["width"]))), out,
              COLUMNS + ["error"])
    plot_grid(out, HERE)
    return out


def table(path: Path) -> str:
    """Markdown table of a result CSV: one row per model, one column per (length, width)."""
    rows = [r for r in read_rows(path) if not r.get("error")]
    cols = sorted({(int(r["seq_len"]), int(r["width"])) for r in rows})
    models = sorted({r["layer"] for r in rows}, key=lambda m: (m != "dense", m))
    acc = {(r["layer"], int(r["seq_len"]), int(r["width"])): r for r in rows}
    head = "| model | " + " | ".join(f"T={t}, d={w}" for t, w in cols) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + 1)]
    for m in models:
        cells = []
        for c in cols:
            r = acc.get((m, *c))
            cells.append("" if r is None else f"{float(r['accuracy']):.3f} (lr {float(r['lr']):g}, {r['steps_done']} st)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(lr: float = LR, lengths=(64, 128), plain: bool = True, widths=(64, 128), prompts: bool = True):
    torch.set_num_threads(1)
    CSV = csv_for(lr)
    rows = read_rows(CSV)
    done = {(r["layer"], r["seq_len"], r["width"]) for r in rows if not r.get("error")}
    for r in runs(lengths, plain, widths, prompts):
        name = label(r["model"]) + (" (JRT-Prompt)" if r["prompt"] else "")
        key = (name, str(r["T"]), str(r["W"]))
        if key in done:
            continue
        try:
            task = prompted(r["T"]) if r["prompt"] else "mqar"
            row = train_layer(r["model"], task, seq_len=r["T"], width=r["W"], steps=STEPS[r["T"]], seed=0,
                              device="cpu", batch_size=BATCH, lr=lr, vocab=None if r["prompt"] else VOCAB, n_test=1000,
                              progress=False)
            row["error"] = ""
        except Exception as e:  # recorded, retried next time
            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {e}"[:300], "steps": STEPS[r["T"]]}
        row.update(layer=name, seq_len=r["T"], width=r["W"])
        rows = [x for x in read_rows(CSV) if (x["layer"], x["seq_len"], x["width"]) != key] + [row]
        write_csv(rows, CSV, COLUMNS + ["error"])
        print(f"{name:>24s} T={r['T']} d={r['W']} lr={lr:g}: acc={row.get('accuracy')} "
              f"steps={row.get('steps_done')} ({row.get('train_s')} s) {row['error']}", flush=True)


def extra_run(model: str, steps: int = 1000, width: int = 64, path: str = "extra_runs.csv") -> None:
    """One extra run at T = 64, 6e-3 (``model``: a layer name, or comma-separated names per block, e.g.
    ``baseconv,lightning``: Zoology's MQAR models put a short BaseConv before each mixer) into
    ``path`` (``long_runs.csv``: the 3000-step runs; ``extra_runs.csv``: the conv + mixer pairs)."""
    torch.set_num_threads(1)
    path = HERE / path
    layer = model.split(",") if "," in model else model
    row = train_layer(layer, "mqar", seq_len=64, width=width, steps=steps, seed=0, device="cpu", batch_size=BATCH,
                      lr=LR, vocab=VOCAB, n_test=1000, progress=False)
    row["error"] = ""
    key = (row["layer"], str(row["width"]), str(row["steps"]))
    rows = [x for x in read_rows(path) if (x["layer"], x["width"], x["steps"]) != key] + [row]
    write_csv(rows, path, COLUMNS + ["error"])
    print(f"{row['layer']} T=64 d={width} steps={steps}: acc={row['accuracy']} ({row['train_s']} s)", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--lengths", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--combine", action="store_true")
    ap.add_argument("--prompts-only", action="store_true", help="only the JRT-Prompt runs (T=64)")
    ap.add_argument("--long", help="one 3000-step run of this model at T=64, width 64 (long_runs.csv)")
    ap.add_argument("--extra", help="one 1000-step run at T=64 of NAME or NAME,NAME per block (extra_runs.csv)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--widths", type=int, nargs="*", default=[64, 128], help="widths of the plain grid")
    ap.add_argument("--no-prompts", action="store_true", help="skip the JRT-Prompt runs")
    a = ap.parse_args()
    if a.combine:
        print(table(combine()))
    elif a.long:
        extra_run(a.long, steps=3000, path="long_runs.csv")
    elif a.extra:
        extra_run(a.extra, width=a.width)
    else:
        main(a.lr, tuple(a.lengths), plain=not a.prompts_only, widths=tuple(a.widths), prompts=not a.no_prompts)
