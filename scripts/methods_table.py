"""methods_table: fit the calibrated prefill methods on the bundled model and measure every
registered prefill method on it (CPU): attention fidelity on captured q/k/v and passkey accuracy.

Subcommands:

* ``calibrate``: fit MInference (per-head pattern search, arXiv 2407.02490), RazorAttention
  (echo/induction heads on repeated random tokens, arXiv 2407.15891), MoA (profiled elastic
  spans, arXiv 2406.14909) and, with ``--seer-minutes > 0``, SeerAttention gates (arXiv
  2410.13276) on the bundled model through ``sparsattn calibrate <method>`` (``sparsattn.calibrate``);
  writes the files into ``sparsattn/models/bundled/calibration/`` plus ``provenance.json``.
* ``table`` (default): for every registered prefill method (two or three settings each, the
  calibrated ones from the shipped files), fidelity against dense attention on q/k/v captured
  from held-out prompts (attention recall, top-10 recall, relative output error, density; mean
  over the chosen layers and heads), and passkey accuracy at 4K (noise haystack, 5 depths,
  greedy generation under ``sparsattn.integrations.hf.patched(..., backend="reference")``).
  Writes a CSV and a Pareto plot (recall and passkey accuracy vs density).

Run ``python scripts/methods_table.py table --quick`` for a fast smoke run (one prompt, two
layers, two depths, one setting per method).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsattn.models import bundled_path  # noqa: E402

CAL_DIR = ROOT / "sparsattn" / "models" / "bundled" / "calibration"
OUT_CSV = ROOT / "docs" / "results" / "methods_bundled_cpu_2026-11-28.csv"
#: SeerAttention gate directory (not shipped by default: see docs/methods.md); override with --seer-gate
SEER_GATE = CAL_DIR / "seer_gate"
OUT_PNG = ROOT / "docs" / "results" / "methods_bundled_cpu_2026-11-28.png"

def load(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = str(bundled_path())
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model, tok


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------

def calibrate(which: list[str], seer_minutes: float, seer_steps: int, moa_samples: int = 1, moa_answer_len: int = 16) -> None:
    """Regenerate the shipped calibrations: one ``sparsattn calibrate <method>`` per entry of ``which``
    (``seer`` = ``seer_attention``, only with ``seer_minutes > 0``); each updates provenance.json."""
    from sparsattn.calibrate import calibrate as run_calibration

    options = {"moa": {"samples_per_length": moa_samples, "answer_len": moa_answer_len},
               "seer_attention": {"minutes": seer_minutes, "steps": seer_steps}}
    for name in which:
        name = {"seer": "seer_attention"}.get(name.strip(), name.strip())
        if name == "seer_attention" and seer_minutes <= 0:
            continue
        m, rec = run_calibration(name, **options.get(name, {}))
        print(f"{name}: {m.path} ({rec['seconds']} s)")


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------

def settings(quick: bool) -> list[tuple[str, str, dict]]:
    """(method, label, config) per row; configs chosen for a 4K context (densities ~5-30%)."""
    c = CAL_DIR
    s = [
        ("dense", "dense", {}),
        ("a_shape", "sink64+local192", {"n_init": 64, "n_local": 192}),
        ("a_shape", "sink64+local448", {"n_init": 64, "n_local": 448}),
        ("vertical_slash", "v100/s200", {"v_size": 100, "s_size": 200}),
        ("vertical_slash", "v300/s500", {"v_size": 300, "s_size": 500}),
        ("vertical_slash", "v64/s16", {"v_size": 64, "s_size": 16}),
        ("block_sparse", "top4", {"top_k": 4}),
        ("block_sparse", "top8", {"top_k": 8}),
        ("hip", "k128/sw128", {"mask_k": 128, "sliding_window_size": 128}),
        ("hip", "k256/sw256", {"mask_k": 256, "sliding_window_size": 256}),
        ("longheads", "w128/len512", {"window_size": 128, "atten_length": 512}),
        ("longheads", "w256/len1024/mean-keys", {"window_size": 256, "atten_length": 1024, "chunk_key": "mean"}),
        ("masformer", "full{0}+ashape(64,192)", {"full_layers": (0,), "inner": "a_shape",
                                                 "inner_config": {"n_init": 64, "n_local": 192}}),
        ("masformer", "full{0,4}+ashape(64,192)", {"full_layers": (0, 4), "inner": "a_shape",
                                                   "inner_config": {"n_init": 64, "n_local": 192}}),
        ("oracle_topk", "d0.05", {"density": 0.05}),
        ("oracle_topk", "d0.10", {"density": 0.10}),
        ("s2_attention", "local2/stride16", {"local_blocks": 2, "vert_stride": 16}),
        ("s2_attention", "local4/stride8", {"local_blocks": 4, "vert_stride": 8}),
        ("minference", "calibrated", {"path": str(c / "minference.json")}),
        ("razor", "win256 (C=16)", {"path": str(c / "razor.json"), "min_window": 256, "compression": 16.0}),
        ("razor", "win512 (C=8)", {"path": str(c / "razor.json"), "min_window": 512, "compression": 8.0}),
        ("moa", "calibrated b0.5", {"path": str(c / "moa.json")}),
        ("seer_attention", "nz0.10", {"path": str(SEER_GATE), "nz_ratio": 0.10}),
    ]
    missing = [(m, lab) for m, lab, cfg in s
               if any(k in ("path", "plan_path", "gate_path") and not Path(v).exists() for k, v in cfg.items())]
    for m, lab in missing:
        print(f"skip {m} {lab}: calibration file missing (run `calibrate` first)")
    s = [x for x in s if (x[0], x[1]) not in missing]
    seen, first, rest = set(), [], []
    for x in s:  # one setting per method first, so that a partial run covers every method
        (rest if x[0] in seen else first).append(x)
        seen.add(x[0])
    return first if quick else first + rest


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------

def capture(model, ids):
    """({layer: (q, k, v, q_pre_rope, k_pre_rope)}, {layer: softmax scale}) of one prompt
    (``sparsattn.eval.prefill_quality.capture_prompt``; pre-RoPE tensors for SeerAttention)."""
    from sparsattn.eval.prefill_quality import capture_prompt

    c = capture_prompt(model, ids)
    return c.layers, c.scales


def fidelity_one(m, name, caps, scales, layers, rows) -> dict:
    """Pooled fidelity of method ``m`` (selecting on every layer up to the last chosen one, in order)
    on the chosen layers, over the last ``rows`` query rows (None = all), mean over prompts/layers/heads."""
    from sparsattn.eval.fidelity import attention_fidelity
    from sparsattn.evaluate import _pattern_rows
    from sparsattn.methods.base import SelectContext

    if m is None:
        return {"recall": 1.0, "topk_recall": 1.0, "rel_error": 0.0, "density": 1.0, "select_s": 0.0}
    acc = {"recall": [], "topk_recall": [], "density": [], "err": 0.0, "ref": 0.0, "sel": 0.0}
    for cap in caps:
        state: dict = {}
        for l in sorted(cap):
            if l > max(layers):
                break
            q, k, v, qp, kp = cap[l]
            ctx = SelectContext(layer=l, causal=True, scale=scales[l],
                                q_offset=0, state=state,
                                extras={"phase": "prefill", "q_lens": None, "kv_lens": None,
                                        "padding_side": "right", "sliding_window": None,
                                        "num_kv_groups": q.shape[1] // k.shape[1],
                                        "q_pre_rope": qp, "k_pre_rope": kp, "v": v})
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = m.select(q, k, ctx)
            acc["sel"] += time.perf_counter() - t0
            if l not in layers:
                continue
            T = q.shape[2]
            r0 = 0 if rows is None else max(0, T - rows)
            r = attention_fidelity(q[:, :, r0:].float(), k.float(), v.float(), _pattern_rows(p, r0), causal=True,
                                   scale=ctx.scale)
            acc["recall"].append(float(r.recall.mean()))
            acc["topk_recall"].append(float(r.topk_recall.mean()))
            acc["density"].append(float(r.density.mean()))
            acc["err"] += float(r.err_sq.sum())
            acc["ref"] += float(r.ref_sq.sum())
    n = len(acc["recall"])
    return {"recall": sum(acc["recall"]) / n, "topk_recall": sum(acc["topk_recall"]) / n,
            "rel_error": math.sqrt(acc["err"] / acc["ref"]), "density": sum(acc["density"]) / n,
            "select_s": acc["sel"]}


def passkey_samples(tok, length: int, depths, seed: int = 0) -> list:
    from sparsattn.eval import make_samples

    out = []
    for i, d in enumerate(depths):
        out += make_samples("passkey", tok, length, 1, seed=seed + 7919 * i, progress=False, depth=d, haystack="noise")
    return out


def passkey_one(model, tok, m, samples, max_new_tokens: int) -> dict:
    """Greedy passkey accuracy of method ``m`` (None = the unpatched dense model), batch 1."""
    from sparsattn.eval.scoring import get_scorer
    from sparsattn.evaluate import _generate
    from sparsattn.integrations.hf import patched

    scorer = get_scorer("passkey")
    t0 = time.perf_counter()
    scores = []
    for s in samples:
        if m is None:
            pred = _generate(model, tok, [s.prompt], device="cpu", max_new_tokens=max_new_tokens)[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with patched(model, method=m, backend="reference"):
                    pred = _generate(model, tok, [s.prompt], device="cpu", max_new_tokens=max_new_tokens)[0]
        scores.append(100.0 * scorer(pred, s.answers))
    return {"passkey_acc": sum(scores) / len(scores), "passkey_n": len(scores),
            "passkey_by_depth": " ".join(f"{x:.0f}" for x in scores), "passkey_s": time.perf_counter() - t0,
            "passkey_tokens": round(sum(s.meta.get("n_tokens", 0) for s in samples) / len(samples))}


COLS = ["method", "setting", "density", "recall", "topk_recall", "rel_error", "passkey_acc", "passkey_by_depth",
        "passkey_n", "passkey_tokens", "select_s", "passkey_s", "config", "error"]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    cmap = plt.get_cmap("tab20")
    marks = "os^Dv<>pPX*hH8d"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, lab in ((axes[0], "recall", "attention recall"), (axes[1], "passkey_acc", "passkey accuracy (%)")):
        for i, m in enumerate(methods):
            rs = sorted([r for r in rows if r["method"] == m and r.get(key) not in (None, "")
                         and r.get("density") not in (None, "")],
                        key=lambda r: r["density"])
            if not rs:
                continue
            ax.plot([r["density"] for r in rs], [r[key] for r in rs], marker=marks[i % len(marks)], ls="-", lw=0.8,
                    color=cmap(i % 20), label=m, ms=7, alpha=0.85)
        ax.set_xscale("log")
        ax.set_xlabel("density (kept / causal pairs, mean over layers and heads)")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8, loc="lower right", ncol=2)
    axes[1].set_ylim(-5, 105)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(args) -> None:
    from sparsattn.eval.perplexity import heldout_token_stream

    model, tok = load()
    n_layers = model.config.num_hidden_layers
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(n_layers))
    n_prompts = args.prompts
    depths = [float(x) for x in args.depths.split(",")]
    if args.quick:
        layers, n_prompts, depths = [0, n_layers - 1], 1, [0.1, 0.9]
        args.fid_rows = 256
    setups = settings(args.quick)
    if args.methods:
        keep = set(args.methods.split(","))
        setups = [s for s in setups if s[0] in keep or s[0] == "dense"]
    print(f"{len(setups)} settings, layers {layers}, {n_prompts} prompt(s) x {args.length} tokens "
          f"(fidelity on the last {args.fid_rows or args.length} query rows), depths {depths}", flush=True)
    from sparsattn.methods.base import get_method

    t0 = time.time()
    out_csv = Path(args.out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.resume and out_csv.is_file():
        with open(out_csv) as fh:
            for r in csv.DictReader(fh):
                for k in ("density", "recall", "topk_recall", "rel_error", "passkey_acc", "select_s", "passkey_s"):
                    r[k] = float(r[k]) if r.get(k) not in (None, "") else None
                if not r.get("error"):  # settings that failed are run again
                    rows.append(r)
    done = {(r["method"], r["setting"]) for r in rows}
    caps, scales = [], None
    for i in range(0 if args.no_fidelity else n_prompts):
        ids = heldout_token_stream(tok, args.length, seed=1000 + i)[None]
        c, scales = capture(model, ids)
        caps.append(c)
    samples = None if args.no_passkey else passkey_samples(tok, args.length, depths)
    env = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "machine": f"CPU {platform.machine()}, {torch.get_num_threads()} threads (shared)", "layers": layers,
           "prompts": n_prompts, "length": args.length, "fid_rows": args.fid_rows, "depths": depths,
           "prompt_source": "sparsattn.eval.perplexity.heldout_token_stream(tok, length, seed=1000 + i)",
           "passkey": "sparsattn.eval make_samples('passkey', haystack='noise', depth=d, seed=7919*i), batch 1, "
                      f"greedy {args.max_new_tokens} tokens, patched(model, method, backend='reference')"}
    for name, label, cfg in setups:
        if (name, label) in done:
            continue
        r = {"method": name, "setting": label}
        m = None
        try:
            m = None if name == "dense" else get_method(name, **cfg)
            if not args.no_fidelity:
                r.update(fidelity_one(m, name, caps, scales, layers, args.fid_rows or None))
        except Exception as e:  # recorded in the CSV, the other settings still run
            r["error"] = f"fidelity: {type(e).__name__}: {e}"[:300]
            print(f"  {name} {label}: {r['error']}", flush=True)
        print(f"  {name:15s} {label:26s} " + " ".join(f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float)),
              flush=True)
        if samples is not None and "error" not in r:
            try:
                r.update(passkey_one(model, tok, m, samples, args.max_new_tokens))
            except Exception as e:
                r["error"] = f"passkey: {type(e).__name__}: {e}"[:300]
                print(f"  {name} {label}: {r['error']}", flush=True)
            if "passkey_acc" in r:
                print(f"  {'':15s} {'':26s} passkey={r['passkey_acc']:.0f} [{r['passkey_by_depth']}] "
                      f"{r['passkey_s']:.0f}s", flush=True)
        r["config"] = json.dumps({k: (Path(v).name if k.endswith("path") else v) for k, v in cfg.items()},
                                 sort_keys=True)
        rows.append(r)
        with open(out_csv, "w", newline="") as fh:  # rewritten after every setting (partial runs keep rows)
            w = csv.DictWriter(fh, fieldnames=COLS, extrasaction="ignore")
            w.writeheader()
            for x in rows:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in x.items()})
        env.update({"seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        out_csv.with_name(out_csv.stem + "_env.json").write_text(json.dumps(env, indent=1) + "\n")
        plot(rows, Path(args.out_png),
             f"bundled 24M Llama, CPU, {args.length} tokens: fidelity on {n_prompts} held-out prompt(s), layers "
             f"{','.join(map(str, layers))}, last {args.fid_rows or args.length} rows; passkey (noise) "
             f"{len(depths)} depths x 1 seed")
    print(f"wrote {out_csv}, {args.out_png} in {time.time() - t0:.0f}s")


def merge(fid_csv: str, pk_csv: str, out_csv: str, out_png: str, title: str) -> None:
    """merge: join a fidelity-only and a passkey-only run (same settings) into one CSV and plot."""
    def read(p):
        with open(p) as fh:
            return {(r["method"], r["setting"]): r for r in csv.DictReader(fh)}
    f, k = read(fid_csv), read(pk_csv)
    rows = []
    for key, r in f.items():
        x = dict(r)
        for c in ("passkey_acc", "passkey_by_depth", "passkey_n", "passkey_tokens", "passkey_s"):
            x[c] = k.get(key, {}).get(c, "")
        x["error"] = "; ".join(e for e in (r.get("error"), k.get(key, {}).get("error")) if e)
        rows.append(x)
    with open(out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print("| method | setting | density | attention recall | top-10 recall | rel. output error | passkey acc. (%) "
          "| passkey by depth 0/.25/.5/.75/1 |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        def f(c, fmt="{:.3f}"):
            return fmt.format(float(x[c])) if x.get(c) not in (None, "") else "not run"
        pk, pkd = f('passkey_acc', '{:.0f}'), x.get('passkey_by_depth') or 'not run'
        if "passkey:" in (x.get("error") or ""):
            pk, pkd = "failed", "error (see CSV)"
        print(f"| `{x['method']}` | {x['setting']} | {f('density')} | {f('recall')} | {f('topk_recall')} | "
              f"{f('rel_error')} | {pk} | {pkd} |")
    for x in rows:
        for c in ("density", "recall", "passkey_acc"):
            x[c] = float(x[c]) if x.get(c) not in (None, "") else None
    plot(rows, Path(out_png), title)


def main(argv=None) -> int:
    global SEER_GATE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("calibrate", help="fit minference / razor / moa / seer gates into the package")
    c.add_argument("--which", default="minference,razor,moa", help="comma list of minference,razor,moa,seer")
    c.add_argument("--seer-minutes", type=float, default=4.0)
    c.add_argument("--seer-steps", type=int, default=80)
    c.add_argument("--moa-samples", type=int, default=1)
    c.add_argument("--moa-answer-len", type=int, default=16)
    mg = sub.add_parser("merge", help="join a --no-passkey and a --no-fidelity run into one CSV + plot")
    mg.add_argument("fid_csv")
    mg.add_argument("pk_csv")
    mg.add_argument("--out-csv", default=str(OUT_CSV))
    mg.add_argument("--out-png", default=str(OUT_PNG))
    mg.add_argument("--title", default="bundled 24M Llama, CPU, 4096 tokens")
    t = sub.add_parser("table", help="fidelity + passkey table and plot")
    for p in (t,):
        p.add_argument("--quick", action="store_true", help="1 prompt, 2 layers, 2 depths, 1 setting per method")
        p.add_argument("--length", type=int, default=4096)
        p.add_argument("--prompts", type=int, default=1)
        p.add_argument("--layers", default="", help="comma list (default all)")
        p.add_argument("--depths", default="0.0,0.25,0.5,0.75,1.0")
        p.add_argument("--methods", default="", help="comma list to restrict (dense always kept)")
        p.add_argument("--no-passkey", action="store_true")
        p.add_argument("--no-fidelity", action="store_true")
        p.add_argument("--max-new-tokens", type=int, default=12)
        p.add_argument("--out-csv", default=str(OUT_CSV))
        p.add_argument("--out-png", default=str(OUT_PNG))
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--fid-rows", type=int, default=1024, help="fidelity on the last this many query rows (0 = all)")
        p.add_argument("--resume", action="store_true", help="keep rows already in the CSV, run the others")
        p.add_argument("--seer-gate", default=str(SEER_GATE), help="SeerAttention gate directory")
    a = ap.parse_args(argv)
    if getattr(a, "seer_gate", None):
        SEER_GATE = Path(a.seer_gate)
    torch.set_num_threads(getattr(a, "threads", 2))
    if a.cmd == "merge":
        merge(a.fid_csv, a.pk_csv, a.out_csv, a.out_png, a.title)
    elif a.cmd == "calibrate":
        calibrate(a.which.split(","), a.seer_minutes, a.seer_steps, a.moa_samples, a.moa_answer_len)
    else:
        if a.cmd is None:
            a = ap.parse_args(["table"] + list(argv or sys.argv[1:]))
        table(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
