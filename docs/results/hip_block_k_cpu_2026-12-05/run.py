"""HiP at block_k 16 (the earlier simplification) and 2 (the paper's block_size_k) against oracle_topk at
the same density: teacher-forced passkey on the bundled model at 4K (issue 10, §3.9).

Same protocol as ``sparsattn.eval.prefill_quality`` (its public functions): the knob of each setting is
searched on the calibration passkey prompt (seed CAL_SEED, never scored) to 10% measured density (mean
over the 8 layers); passkey = teacher forcing of prompt + answer in one forward of the patched model,
correct iff every answer token is the argmax; needles at depths linspace(0, 1, n), noise haystack.

    OMP_NUM_THREADS=1 python docs/results/hip_block_k_cpu_2026-12-05/run.py --n 20 --out <dir>
"""
import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from sparsattn.bench.common import write_csv
from sparsattn.eval import prefill_quality as pq
from sparsattn.evaluate import load_model


def families(T, target):
    b = target * (T + 1) / 2
    window = int(max(16, b // 4))  # prefill_quality.knob_family's rule for hip

    def hip(bk):
        return pq.Family("hip", "mask_k/16", 1, max(1, -(-T // 16)), True, True, max(1.0, (b - window - 16) / 16),
                         lambda x: dict(mask_k=16 * int(x), block_size_q=64, block_k=bk, sink_token_size=16,
                                        sliding_window_size=window),
                         lambda x: f"k{16 * int(x)}/sw{window}/bk{bk}")
    return [hip(16), hip(2), pq.knob_family("oracle_topk", T, target)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--density", type=float, default=0.1)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.time()
    model, tok, _ = load_model(None, device="cpu")
    L = a.length
    cal = pq.make_prompts(tok, "passkey", L, 1, pq.CAL_SEED)[0]
    cap = pq.capture_prompt(model, torch.tensor([cal.prompt_ids + cal.answer_ids]))
    settings = []
    for fam in families(L, a.density):
        def measure(x, fam=fam):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pq.measure_density(pq.Setting(fam.method, a.density, L, "", fam.config(x)).build(), cap)[0]
        r = pq.search_knob(measure, a.density, lo=fam.lo, hi=fam.hi, guess=fam.guess, integer=fam.integer,
                           increasing=fam.increasing)
        s = pq.Setting(fam.method, a.density, L, fam.label(r.x), fam.config(r.x), density_cal=r.density,
                       target_met=r.met, evals=len(r.evals))
        settings.append(s)
        print(f"[{time.time() - t0:6.0f}s] {s.label}: density {r.density:.4f} ({len(r.evals)} evals)", flush=True)
    del cap
    samples = pq.make_prompts(tok, "passkey", L, a.n, pq.SAMPLE_SEED)
    rows, per_sample = [], []
    for s in settings + [None]:  # the unpatched model last
        agg, rs = pq.run_passkey(model, tok, s, samples, device="cpu", backend="reference")
        name = "sdpa_dense" if s is None else s.method
        label = "unpatched" if s is None else s.label
        correct = sum(r["correct"] for r in rs)
        rows.append({"method": name, "setting": label, "density_cal": "" if s is None else round(s.density_cal, 4),
                     "density_scored": round(agg["density"], 4), "correct": correct, "n": agg["n"],
                     "acc": round(agg["acc"], 1), "token_acc": round(agg["token_acc"], 1),
                     "by_depth": agg["by_depth"], "seconds": round(agg["seconds"], 1),
                     "config": "" if s is None else json.dumps(s.config, sort_keys=True)})
        per_sample += [{"method": name, "setting": label, **r} for r in rs]
        print(f"[{time.time() - t0:6.0f}s] {name} {label}: {correct}/{agg['n']} (density {agg['density']:.4f}) "
              f"by depth {agg['by_depth']}", flush=True)
        write_csv(rows, out / "passkey.csv")
        write_csv(per_sample, out / "passkey_samples.csv")
    env = {"torch": torch.__version__, "machine": "CPU x86_64, 2 cores shared with other jobs, 1 thread",
           "date": time.strftime("%Y-%m-%d", time.gmtime()), "seconds": round(time.time() - t0, 1),
           "n": a.n, "length": L, "density": a.density}
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")


if __name__ == "__main__":
    main()
