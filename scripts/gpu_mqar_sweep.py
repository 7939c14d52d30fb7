"""MQAR sweep on one GPU with several worker processes (issue 18's accuracy grid in one device call).

Small MQAR models leave an H200 mostly idle, so ``--workers`` processes share it, each training its
share of (layer, width) runs one after the other through the layer harness
(``sparsattn.train.layerbench.train_layer``) with a per-run time limit; rows go to one CSV per worker,
merged at the end into ``mqar.csv`` with the harness's plots. Accuracy only: do not time anything
else on the GPU while it runs.

    python scripts/gpu_mqar_sweep.py --out DIR --seq-len 512 --widths 128 256 --workers 8 \
        --steps 4000 --time-limit 70 [--layers ...] [--hybrids baseconv,dense ...]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import traceback
from pathlib import Path


def _worker(i: int, runs: list, args) -> None:
    from sparsattn.bench.common import write_csv
    from sparsattn.train.layerbench.loop import COLUMNS, train_layer

    rows = []
    for layer, width in runs:
        try:
            row = train_layer(layer, "mqar", seq_len=args.seq_len, width=width, steps=args.steps, seed=0,
                              device="cuda", progress=False, time_limit_s=args.time_limit)
            row["error"] = ""
        except Exception as e:  # recorded in the row
            traceback.print_exc()
            name = layer if isinstance(layer, str) else "+".join(layer)
            row = {"layer": name, "task": "mqar", "seq_len": args.seq_len, "width": width,
                   "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        write_csv(rows, Path(args.out) / f"mqar_w{i}.csv", COLUMNS + ["error"])
        print(f"[w{i}] {row['layer']:>16s} d={width}: acc={row.get('accuracy')} steps={row.get('steps_done')} "
              f"({row.get('train_s')} s) {row.get('error', '')}", flush=True)


def main() -> int:
    from sparsattn.nn import layer_class, list_layers

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--time-limit", type=float, default=70.0)
    p.add_argument("--layers", nargs="*")
    p.add_argument("--hybrids", nargs="*", default=["baseconv,dense", "lightning,dense"])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.layers or [n for n in list_layers() if True in tuple(layer_class(n).causal_modes)
                            and (layer_class(n).layout == "1d" or "mqar" in layer_class(n).presets)]
    models = [n for n in names] + [h.split(",") for h in args.hybrids]
    runs = [(m, w) for w in args.widths for m in models]
    shares = [runs[i::args.workers] for i in range(args.workers)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(i, s, args)) for i, s in enumerate(shares) if s]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()
    from sparsattn.bench.common import write_csv
    from sparsattn.train.layerbench.grid import plot_grid, read_rows
    from sparsattn.train.layerbench.loop import COLUMNS

    rows = [r for f in sorted(out.glob("mqar_w*.csv")) for r in read_rows(f)]
    write_csv(rows, out / "mqar.csv", COLUMNS + ["error"])
    for f in out.glob("mqar_w*.csv"):
        f.unlink()
    plot_grid(out / "mqar.csv")
    print(f"{len(rows)} rows -> {out / 'mqar.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
