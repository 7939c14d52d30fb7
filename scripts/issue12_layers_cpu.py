"""issue12_layers_cpu: the reduced CPU runs of issue 12's routing / biformer / neighborhood / halo /
sparsifiner layers (and dense beside them) through the shared harness (``train_layer``), including
the layers whose class layout is 2-D but which have a 1-D preset for sequences (biformer,
neighborhood), which the grid's default layer list leaves out of MQAR.

Usage (one CSV row per run, appended; runs already in the CSV are skipped):

    OMP_NUM_THREADS=1 python scripts/issue12_layers_cpu.py --task mqar --out runs/i12_mqar.csv \
        --layers dense routing sparsifiner biformer neighborhood --seq-lens 128 64 --widths 64 128 --steps 2000
    OMP_NUM_THREADS=1 python scripts/issue12_layers_cpu.py --task pathfinder --out runs/i12_pf.csv \
        --layers dense neighborhood halo biformer sparsifiner --seq-lens 1024 --widths 32 --steps 400 \
        --batch-size 16 --n-train 6400 --n-test 1000
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

from sparsattn.train.layerbench import COLUMNS, train_layer


def main(argv=None) -> None:
    """Parse the arguments and run every (seq_len, width, layer) row missing from ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, choices=["mqar", "listops", "pathfinder"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", nargs="+", required=True)
    ap.add_argument("--seq-lens", nargs="+", type=int, required=True)
    ap.add_argument("--widths", nargs="+", type=int, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None, help="MQAR vocabulary (the reduced grid uses 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=None, help="JSON hyper-parameters over the layer's task preset")
    a = ap.parse_args(argv)
    if a.task == "mqar" and a.vocab is None:
        a.vocab = 512
    done = set()
    if os.path.exists(a.out):
        with open(a.out) as f:
            done = {(r["layer"], int(r["seq_len"]), int(r["width"])) for r in csv.DictReader(f)}
    cols = COLUMNS + ["wall_s"]
    for T in a.seq_lens:
        for w in a.widths:
            for name in a.layers:
                if (name, T, w) in done:
                    continue
                kw = {k: v for k, v in (("batch_size", a.batch_size), ("n_train", a.n_train), ("n_test", a.n_test),
                                        ("vocab", a.vocab)) if v is not None}
                t0 = time.time()
                if a.config:
                    kw["layer_config"] = json.loads(a.config)
                row = train_layer(name, a.task, seq_len=T, width=w, steps=a.steps, seed=a.seed, progress=False, **kw)
                row["wall_s"] = round(time.time() - t0, 1)
                new = not os.path.exists(a.out)
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                with open(a.out, "a", newline="") as f:
                    wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
                    if new:
                        wr.writeheader()
                    wr.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()})
                print(f"{name:12s} T={T} w={w} acc={row['accuracy']:.4f} density={row['density']} "
                      f"steps={row['steps_done']} loss={row['final_loss']} wall={row['wall_s']}s", flush=True)


if __name__ == "__main__":
    main()
