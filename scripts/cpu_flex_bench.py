"""cpu_flex_bench: dense SDPA vs the flex backend (compiled FlexAttention) vs the reference backend on the CPU.

Issue 16 item 4. One process, one sweep: for each length and density, a sink + window pattern
(``patterns.sink_local``, 64 sink tokens, the window set for the target density, block 64: the
demo methods' block), batch 1, 8 query / 2 KV heads, head_dim 64, float32, inference
(``torch.no_grad``). Times are wall-clock medians of ``--reps`` calls after one warm-up call
(the first flex call of a shape compiles, or loads Inductor's disk cache: reported separately as
``flex_first_s``); dense SDPA and flex calls alternate, since the machine is shared and its load
drifts. The reference is timed up to ``--ref-max`` tokens and at the ``--ref-extra`` points. Correctness: ``||flex - reference|| / ||reference||`` on every point.

The prediction is written before the measurement: ``flex_pred_s = density * sdpa_s + 0.005`` (the
same per-pair cost as dense SDPA, plus a fixed 5 ms) -- a block-skipping kernel whose time follows
the density.

    OMP_NUM_THREADS=2 python scripts/cpu_flex_bench.py --out docs/results/cpu_flex_2026-12-05
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsattn import attention, patterns
from sparsattn._environment import environment
from sparsattn.kernels.block_sparse import flex


def _median(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def pattern_at(T: int, density: float, block: int = 64, sink: int = 64):
    """sink + window pattern whose density (computed / causal pairs) is about ``density`` at length T."""
    keep = density * (T + 1) / 2  # mean kept keys per causal row
    window = max(1, int(round(keep - sink)))
    return patterns.sink_local(T, sink, window, block_q=block)


def run(lengths, densities, reps: int, out: Path, ref_max: int, ref_extra=()) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    Hq, Hkv, D = 8, 2, 64
    path = out / "cpu_flex.csv"
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        q = torch.randn(1, Hq, T, D, generator=g)
        k = torch.randn(1, Hkv, T, D, generator=g)
        v = torch.randn(1, Hkv, T, D, generator=g)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        with torch.no_grad():
            sdpa()  # warm-up
            for dens in densities:
                p = pattern_at(T, dens)
                d = float(p.density)
                row = {"tokens": T, "target_density": dens, "density": round(d, 4), "heads_q": Hq, "heads_kv": Hkv,
                       "head_dim": D, "block": p.block_q}
                t0 = time.perf_counter()
                fo = attention(q, k, v, p, backend="flex")
                row["flex_first_s"] = round(time.perf_counter() - t0, 2)
                # dense SDPA and flex interleaved (the machine is shared: load drifts between calls)
                st, ft = [], []
                for _ in range(reps):
                    st.append(_median(sdpa, 1))
                    ft.append(_median(lambda: attention(q, k, v, p, backend="flex"), 1))
                sdpa_s = statistics.median(st)
                row["sdpa_s"] = round(sdpa_s, 4)
                row["flex_pred_s"] = round(d * sdpa_s + 0.005, 4)
                row["flex_s"] = round(statistics.median(ft), 4)
                if T <= ref_max or (T, dens) in ref_extra:
                    ro = attention(q, k, v, p, backend="reference")
                    row["reference_s"] = round(_median(lambda: attention(q, k, v, p, backend="reference"), max(1, reps - 1)), 4)
                    row["flex_vs_ref_rel_err"] = float((fo - ro).norm() / ro.norm())
                row["speedup_flex_vs_sdpa"] = round(sdpa_s / row["flex_s"], 3)
                if "reference_s" in row:
                    row["speedup_reference_vs_sdpa"] = round(sdpa_s / row["reference_s"], 3)
                row["load_avg_1min"] = round(os.getloadavg()[0], 2)
                rows.append(row)
                print(row, flush=True)
                _write(path, rows)
                flex._CPU_SHAPES.clear()  # a sweep, not a served model: keep every shape eligible
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--densities", default="0.1,0.2,0.5")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ref-max", type=int, default=8192, help="time the reference up to this length")
    ap.add_argument("--ref-extra", default="16384:0.2", help="more (length:density) points with the reference")
    ap.add_argument("--out", default="docs/results/cpu_flex_2026-12-05")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment("cpu", args=vars(a))
    env["load_avg_start"] = os.getloadavg()
    env["note"] = ("shared 2-core CPU: other jobs ran at the same time (load average recorded per row); "
                   "absolute times drift, ratios are from the same process minutes apart")
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    extra = {(int(x.split(":")[0]), float(x.split(":")[1])) for x in a.ref_extra.split(",") if x}
    run([int(x) for x in a.lengths.split(",")], [float(x) for x in a.densities.split(",")], a.reps, out, a.ref_max,
        extra)
    env["load_avg_end"] = os.getloadavg()
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
