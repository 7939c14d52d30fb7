"""``sparsattn train-layer``: one run (``--layer``/``--mixers``) or a grid (``--grid``), CSV + plots."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the train-layer options to ``p`` (the sub-parser of ``sparsattn``)."""
    p.add_argument("--layer", help="a registered layer (sparsattn.nn.list_layers()), used in every block")
    p.add_argument("--mixers", help="comma-separated layer per block for a hybrid, e.g. baseconv,dense")
    p.add_argument("--task", default="mqar", choices=["mqar", "listops", "pathfinder"])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    p.add_argument("--config", default=None, help="layer hyper-parameters as JSON, e.g. '{\"top_k\": 2}'")
    p.add_argument("--heads", type=int)
    p.add_argument("--n-layers", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--vocab", type=int, help="MQAR vocabulary (default 8192)")
    p.add_argument("--grid", choices=["reduced", "full"], help="run a grid instead of one model (resumable)")
    p.add_argument("--layers", nargs="*", help="grid: only these layers (default: every layer that fits the task)")
    p.add_argument("--tasks", nargs="*", help="grid: only these tasks")
    p.add_argument("--hybrids", nargs="*", default=[], help="grid: extra hybrid models, each comma-separated")
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--seq-lens", type=int, nargs="*", help="grid: only these sequence lengths")
    p.add_argument("--widths", type=int, nargs="*", help="grid: only these widths")
    p.add_argument("--max-minutes", type=float, help="grid: start no run that would end past this budget")
    p.add_argument("--shard", default="0/1", help="grid: i/n, run every n-th row from i (one process per GPU)")
    p.add_argument("--out", default="layers_grid/results.csv", help="CSV (rows are appended / resumed)")
    p.add_argument("--plot-only", action="store_true", help="only redraw the plots of --out")
    p.add_argument("--table", nargs="*", help="print markdown tables of these result CSVs and exit")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=run)
    return p


def run(args) -> int:
    """Entry point of ``sparsattn train-layer`` (parsed ``args`` of ``build_parser``)."""
    import torch

    from ...bench.common import write_csv
    from .grid import plot_grid, read_rows, run_grid, _key
    from .loop import COLUMNS, train_layer

    out = Path(args.out)
    if args.table is not None:
        from .grid import markdown_tables

        print(markdown_tables([Path(p) for p in (args.table or [args.out])]))
        return 0
    if args.plot_only:
        for p in plot_grid(out):
            print(f"wrote {p}")
        return 0
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.grid:
        i, n = (int(v) for v in args.shard.split("/"))
        run_grid(args.grid, out, layers=args.layers, tasks=args.tasks, hybrids=[h.split(",") for h in args.hybrids],
                 seeds=args.seeds, device=args.device, max_minutes=args.max_minutes, shard=(i, n),
                 progress=not args.no_progress, seq_lens=args.seq_lens, widths=args.widths)
        return 0
    if bool(args.layer) == bool(args.mixers):
        raise SystemExit("train-layer: give exactly one of --layer NAME, --mixers A,B,... or --grid")
    layer = args.layer or args.mixers.split(",")
    cfg = json.loads(args.config) if args.config else None
    kw = {k: getattr(args, a) for k, a in (("heads", "heads"), ("n_layers", "n_layers"), ("batch_size", "batch_size"),
                                           ("lr", "lr"), ("vocab", "vocab")) if getattr(args, a) is not None}
    row = train_layer(layer, args.task, seq_len=args.seq_len, width=args.width, steps=args.steps, seed=args.seed,
                      device=args.device, layer_config=cfg, progress=not args.no_progress, **kw)
    row["error"] = ""
    rows = [r for r in read_rows(out) if _key(r) != _key(row)] + [row]
    write_csv(rows, out, COLUMNS + ["error"])
    print(json.dumps({k: row[k] for k in ("layer", "task", "seq_len", "width", "accuracy", "density", "flops",
                                          "train_s", "steps_done")}))
    for p in plot_grid(out):
        print(f"wrote {p}")
    return 0
