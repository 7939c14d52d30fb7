"""Layer-benchmark sweep on one GPU with several worker processes (issue 18's accuracy grid in one device call).

Small models leave an H200 mostly idle, so ``--workers`` processes share it, taking (layer, width,
seed) runs from one queue (the longest first finish last, so no worker idles while another has a
backlog) and training each through the layer harness (``sparsattn.train.layerbench.train_layer``)
with a per-run time limit. ``--deadline`` (seconds from the start) bounds the whole sweep: a run
gets at most the time left before it, less ``--eval-margin`` for its final evaluation, and a run
that would get less than ``--min-run`` is not started (it is listed as skipped). Rows go to one CSV
per worker, merged at the end into ``<task>.csv`` with the harness's plots. Accuracy only: do not
time anything else on the GPU while it runs.

    python scripts/gpu_mqar_sweep.py --out DIR --seq-len 512 --widths 128 256 --workers 12 \
        --steps 20000 --time-limit 150 --deadline 540 [--task mqar] [--layers ...] [--hybrids baseconv,dense ...]

``--deadline`` also stops training that has not finished by then (the data of a run is built
before its time limit starts: 160 000 Pathfinder images take about a minute). A run longer than
one call: ``--checkpoint-dir DIR --schedule-time 1000 --time-limit 500`` saves each run cut by its
time limit under DIR and the same command resumes it (the schedule spans 1000 s).
On the device machine put DIR outside the repository (``/tmp/ckpt``): a warm machine keeps /tmp
between calls, but a folder inside the working-tree copy did not survive the next call (seen
2026-12-05, ``.ckpt``); a machine given back in between loses both.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path


def _worker(i: int, queue, args, t_start: float) -> None:
    import torch

    from sparsattn.bench.common import write_csv
    from sparsattn.train.layerbench.loop import COLUMNS, train_layer

    torch.set_num_threads(1)
    rows = []
    while True:
        try:
            layer, width, seed, lr = queue.get_nowait()
        except Exception:
            break
        name = layer if isinstance(layer, str) else "+".join(layer)
        left = args.deadline - (time.time() - t_start) - args.eval_margin
        if left < args.min_run:
            print(f"[w{i}] skipped {name} d={width} seed={seed} lr={lr}: {left:.0f} s left", flush=True)
            continue
        kw = {k: v for k, v in (("vocab", args.vocab), ("n_train", args.n_train), ("n_test", args.n_test),
                                ("eval_every", args.eval_every), ("lr", lr), ("n_layers", args.n_layers),
                                ("heads", args.heads), ("batch_size", args.batch_size)) if v is not None}
        ck = None
        if args.checkpoint_dir:  # one folder per run: a later call with the same arguments resumes it
            ck = Path(args.checkpoint_dir) / f"{args.task}_T{args.seq_len}_{name}_d{width}_s{seed}_lr{lr}"
            if (ck / "finished.json").exists():  # done in an earlier call: not trained again
                print(f"[w{i}] {name} d={width} seed={seed} lr={lr}: finished in an earlier call "
                      f"({ck / 'finished.json'})", flush=True)
                continue
            kw["checkpoint"] = str(ck)
        if args.schedule_time:
            kw["schedule_time_s"] = args.schedule_time
        try:
            row = train_layer(layer, args.task, seq_len=args.seq_len, width=width, steps=args.steps, seed=seed,
                              device=args.device, progress=False, time_limit_s=min(args.time_limit, left),
                              stop_by=t_start + args.deadline - args.eval_margin, **kw)
            row["error"] = ""
        except Exception as e:  # recorded in the row
            traceback.print_exc()
            row = {"layer": name, "task": args.task, "seq_len": args.seq_len, "width": width, "seed": seed, "lr": lr,
                   "error": f"{type(e).__name__}: {e}"[:300]}
        if ck is not None and not row["error"] and int(row.get("steps_done") or 0) > 0 and not (ck / "state.json").exists():
            ck.mkdir(parents=True, exist_ok=True)  # neither cut by time nor failed: finished
            (ck / "finished.json").write_text(json.dumps(row, default=str))
        rows.append(row)
        write_csv(rows, Path(args.out) / f"{args.task}_w{i}.csv", COLUMNS + ["error"])
        print(f"[w{i}] {name:>16s} d={width} seed={seed} lr={lr}: acc={row.get('accuracy')} steps={row.get('steps_done')} "
              f"({row.get('train_s')} s) {row.get('error', '')}", flush=True)


def main() -> int:
    from sparsattn.train.layerbench.grid import default_layers

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="mqar", choices=["mqar", "listops", "pathfinder"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--time-limit", type=float, default=70.0, help="seconds of training per run at most")
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds from the start for the whole sweep")
    p.add_argument("--eval-margin", type=float, default=25.0, help="seconds kept for a run's final evaluation")
    p.add_argument("--min-run", type=float, default=20.0, help="a run with less training time than this is skipped")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", nargs="*", help="default: every layer that runs the task (the grid's default_layers)")
    p.add_argument("--hybrids", nargs="*", default=["baseconv,dense", "lightning,dense"])
    for k in ("vocab", "n_train", "n_test", "eval_every", "n_layers", "heads", "batch_size"):
        p.add_argument("--" + k.replace("_", "-"), type=int)
    p.add_argument("--lr", type=float, help="one learning rate for every run (default: the task's)")
    p.add_argument("--lrs", type=float, nargs="+", help="a learning-rate sweep: every run once per value")
    p.add_argument("--checkpoint-dir", help="save runs cut by their time limit here (one folder per run) and "
                   "resume them on the next call with the same arguments")
    p.add_argument("--schedule-time", type=float, help="seconds the learning-rate schedule is spread over "
                   "(default --time-limit; with --checkpoint-dir, the whole run's time over its calls)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.layers if args.layers is not None else default_layers(args.task)
    models = list(names) + [h.split(",") for h in args.hybrids]
    # widest first: the longest runs start first
    lrs = args.lrs or [args.lr]
    runs = [(m, w, s, lr) for w in sorted(args.widths, reverse=True) for m in models for s in args.seeds for lr in lrs]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for r in runs:
        queue.put(r)
    t_start = time.time()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_worker, args=(i, queue, args, t_start)) for i in range(min(args.workers, len(runs)))]
    for pr in procs:
        pr.start()
        time.sleep(0.5)
    for pr in procs:
        pr.join()
    from sparsattn.bench.common import write_csv
    from sparsattn.train.layerbench.grid import plot_grid, read_rows
    from sparsattn.train.layerbench.loop import COLUMNS

    parts = sorted(out.glob(f"{args.task}_w*.csv"))
    rows = [r for f in parts for r in read_rows(f)]
    write_csv(rows, out / f"{args.task}.csv", COLUMNS + ["error"])
    for f in parts:
        f.unlink()
    plot_grid(out / f"{args.task}.csv")
    print(f"{len(rows)} of {len(runs)} runs -> {out / (args.task + '.csv')} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
