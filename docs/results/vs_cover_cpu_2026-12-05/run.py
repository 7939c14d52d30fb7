"""Vertical-slash coverage on the bundled model (issue 10, §3.6): computed (query, key) pairs of the
old key-block-aligned cover (``sparsattn.patterns.vertical_slash``), of ``vertical_slash`` now
(``methods._vs_cover``: the PIT kernel's unaligned windows), and of the authors' index conversion
(``convert_vertical_slash_indexes``: merged ranges grow by whole windows), re-derived below as plain
loops; same vertical / slash indices for all three. Also whether every VS head of the shipped
MInference calibration keeps a contiguous local band.

    OMP_NUM_THREADS=1 python docs/results/vs_cover_cpu_2026-12-05/run.py --out <dir>
"""
import argparse
import bisect
import json
import time
import warnings
from pathlib import Path

import torch

from sparsattn import patterns
from sparsattn.bench.common import write_csv
from sparsattn.eval import prefill_quality as pq
from sparsattn.evaluate import load_model
from sparsattn.kernels import estimate
from sparsattn.methods import get_method
from sparsattn.methods._vs_cover import vertical_slash_cover
from sparsattn.methods.minference import _forced_then_topk
from sparsattn.models import BUNDLED_DIR

GRID = [(30, 400), (100, 350), (250, 300), (800, 64)]  # the shipped calibration's vertical-slash candidates


def authors_pairs(T, vert, slash, bs=64):
    """Pairs computed by the authors' kernel for one head (Tq == Tk == T): ranges as their index
    conversion builds them, verticals outside the ranges as columns; causal."""
    vs = sorted(set(vert))
    ds = sorted(set(slash), reverse=True)
    total = 0
    for qb in range(-(-T // bs)):
        end_m = qb * bs + bs
        rows = range(qb * bs, min(end_m, T))
        ranges = []
        for e in (max(end_m - d, bs) for d in ds if d < end_m):
            if ranges and e <= ranges[-1][1]:
                continue
            if ranges and e <= ranges[-1][1] + bs:
                ranges[-1][1] += bs
            else:
                ranges.append([e - bs, e])
        starts = [r[0] for r in ranges]
        r0, r1 = qb * bs, min(end_m, T) - 1
        for a, z in ranges:
            total += sum(max(0, min(z, i + 1) - a) for i in rows)
        for v in vs:
            if v > r1:
                break
            j = bisect.bisect_right(starts, v) - 1
            if j >= 0 and v < ranges[j][1]:
                continue  # inside a range: read by the range
            total += r1 - max(v, r0) + 1
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--plans", default=str(BUNDLED_DIR / "calibration" / "minference.json"),
                    help="comma list of MInference calibration files whose vertical-slash heads are checked")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.time()
    model, tok, _ = load_model(None, device="cpu")
    cal = pq.make_prompts(tok, "passkey", a.length, 1, pq.CAL_SEED)[0]
    cap = pq.capture_prompt(model, torch.tensor([cal.prompt_ids + cal.answer_ids]))
    rows = []
    for layer, (q, k, v, _, _) in cap.layers.items():
        T = q.shape[2]
        vert, slash = estimate.vertical_slash_scores(q, k, 64, scale=cap.scales[layer])
        for vs, ss in GRID:
            vi = _forced_then_topk(vert, 30, vs)
            si = _forced_then_topk(slash, 100, ss)
            old = patterns.vertical_slash(T, vi, si, block_size=64).pair_counts()[0][0]
            new = vertical_slash_cover(T, T, vi, si, block_size=64).pair_counts()[0][0]
            for h in range(q.shape[1]):
                auth = authors_pairs(T, vi[0, h].tolist(), si[0, h].tolist())
                rows.append({"layer": layer, "head": h, "v_size": vs, "s_size": ss, "pairs_aligned": int(old[h]),
                             "pairs_new": int(new[h]), "pairs_authors": auth})
        print(f"[{time.time() - t0:5.0f}s] layer {layer}", flush=True)
    write_csv(rows, out / "pairs.csv")
    summary = {}
    for vs, ss in GRID:
        r = [x for x in rows if (x["v_size"], x["s_size"]) == (vs, ss)]
        s = {k: sum(x[k] for x in r) for k in ("pairs_aligned", "pairs_new", "pairs_authors")}
        s["aligned_over_authors"] = round(s["pairs_aligned"] / s["pairs_authors"], 4)
        s["new_over_authors"] = round(s["pairs_new"] / s["pairs_authors"], 4)
        s["heads_new_above_authors"] = sum(x["pairs_new"] > x["pairs_authors"] for x in r)
        s["heads_new_below_authors"] = sum(x["pairs_new"] < x["pairs_authors"] for x in r)
        summary[f"VS({vs},{ss})"] = s
    # the vertical-slash heads of the calibration(s): contiguous local band with the current code?
    for plan_path in a.plans.split(","):
        minf = get_method("minference", path=plan_path)
        band = []
        for layer, heads in minf.plan.items():
            for h, e in heads.items():
                if e["type"] != "vertical_slash":
                    continue
                q, k = cap.layers[layer][0], cap.layers[layer][1]
                g = q.shape[1] // k.shape[1]
                m = get_method("vertical_slash", v_size=e["v_size"], s_size=e["s_size"], last_q=64, block_size=64)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    p = m.select(q[:, h:h + 1], k[:, h // g:h // g + 1])
                mask = p.to_dense_mask()[0, 0]
                T = mask.shape[0]
                i = torch.arange(T)
                width = min(m.n_local, e["s_size"])
                ok = all(bool(mask[i[dd:], i[dd:] - dd].all()) for dd in range(width))
                band.append({"layer": layer, "head": h, "v_size": e["v_size"], "s_size": e["s_size"],
                             "band_width": width, "band_contiguous": ok})
        summary[f"vs_heads_of {Path(plan_path).name}"] = band
    summary["seconds"] = round(time.time() - t0, 1)
    summary["machine"] = "CPU x86_64, 2 cores shared with other jobs, 1 thread; " + time.strftime("%Y-%m-%d", time.gmtime())
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
