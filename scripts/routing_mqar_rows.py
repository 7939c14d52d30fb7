"""Rows of docs/layers/routing_mqar_fix_cpu.csv: the routing layer on MQAR (V = 512, width 64, 2000 steps, the
harness's defaults otherwise) under one config, plus the routed heads' routing statistics after training.

    OMP_NUM_THREADS=1 python scripts/routing_mqar_rows.py '{"local_window": 4}' 64 [seed] [note]

Appends one row (the harness's columns, then ``note`` and the statistics of the last layer's routed heads on
the first 256 held-out sequences: all query positions and MQAR's answer positions) to the CSV. Single CPU
thread; one run at T = 64 takes 2-4 minutes on the shared 2-core machine.
"""
from __future__ import annotations

import csv
import json
import os
import sys

import torch

from sparsattn.train.layerbench import loop
from sparsattn.train.layerbench.loop import COLUMNS, train_layer

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "layers",
                   "routing_mqar_fix_cpu.csv")
STATS = ["no_key", "co_clustered", "dense_mass"]
EXTRA = ["note"] + [f"{w}_{s}" for w in ("all", "answer") for s in STATS] + ["query_use", "key_use"]


def main() -> None:
    """Train once, append the row."""
    cfg = json.loads(sys.argv[1])
    T = int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    note = sys.argv[4] if len(sys.argv) > 4 else ""
    torch.set_num_threads(1)
    seen = {}
    orig = loop.LayerModel

    class Kept(orig):  # keep a handle on the trained model (train_layer returns only its row)
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["model"] = self

    loop.LayerModel = Kept
    try:
        row = train_layer("routing", "mqar", seq_len=T, width=64, steps=2000, vocab=512, seed=seed,
                          layer_config=cfg, progress=False)
    finally:
        loop.LayerModel = orig
    model = seen["model"].eval()
    from sparsattn.train.layerbench.tasks import make_task

    data = make_task("mqar", T, n_train=1, n_test=1000, seed=seed, vocab=512)
    x, y = data.x_test[:256], data.y_test[:256]
    grab = {}
    last = model.mixers()[-1]
    h = last.register_forward_pre_hook(lambda m, a: grab.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model.hidden(x)
    h.remove()
    row["note"] = note
    if last.routed_heads:
        for where, pos in (("all", None), ("answer", y != -100)):
            st = last.routing_stats(grab["x"], positions=pos)
            for s in STATS:
                row[f"{where}_{s}"] = round(st[s], 4)
        row["query_use"] = json.dumps([[round(v, 3) for v in r] for r in st["query_use"].tolist()])
        row["key_use"] = json.dumps([[round(v, 3) for v in r] for r in st["key_use"].tolist()])
    new = not os.path.exists(OUT)
    with open(OUT, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + EXTRA, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
    print(json.dumps({k: row.get(k) for k in ["seq_len", "accuracy", "density", "steps_done", "train_s"] + EXTRA}),
          flush=True)


if __name__ == "__main__":
    main()
