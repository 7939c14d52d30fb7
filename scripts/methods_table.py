"""methods_table: the registry table of docs/methods.md, the shipped calibrations of the bundled model,
and a fidelity + passkey table of every registered prefill method on it (CPU). Everything comes from
the method registry and the methods' own presets: no method is named here.

Subcommands:

* ``registry``: the "Registered methods" table of ``docs/methods.md`` from the registry alone (name,
  ``paper``, ``phase``, ``needs`` + ``calibration_kind``, dataclass defaults); ``--write`` replaces the
  table in the document, ``--check`` exits 1 when the document's table differs.
* ``calibrate``: regenerate the shipped calibrations (``sparsattn calibrate <method>`` for every
  calibrated method whose shipped file exists, or ``--which``; method options as
  ``--set METHOD.OPTION=VALUE``); each updates ``provenance.json``.
* ``table`` (default): for every registered prefill method, its fixed settings
  (``Method.fixed_settings``: dense, the shipped calibrations) and its density preset
  (``Method.density_knob`` at its first guess) for targets 0.05 and 0.1 at the prompt length,
  calibrated methods on the shipped files: fidelity against dense attention on q/k/v captured from
  held-out prompts (attention recall, top-10 recall, relative output error, density; mean over the
  chosen layers and heads), and passkey accuracy (noise haystack, 5 depths, greedy generation under
  ``sparsattn.integrations.hf.patched(..., backend="reference")``), with the unpatched model
  (``sdpa_dense``) as the reference row. Writes a CSV and a Pareto plot (recall and passkey
  accuracy vs density).

Run ``python scripts/methods_table.py table --quick`` for a fast smoke run (one prompt, two
layers, two depths, one setting per method).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sparsattn.models import bundled_path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"
OUT_CSV = ROOT / "docs" / "results" / "methods_bundled_cpu_2026-11-28.csv"
OUT_PNG = ROOT / "docs" / "results" / "methods_bundled_cpu_2026-11-28.png"
#: the density targets of the table's preset settings
TARGETS = (0.05, 0.1)
#: the reference row: the unpatched model (transformers SDPA), no method
REFERENCE = ("sdpa_dense", "unpatched model", None)


def load(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = str(bundled_path())
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model, tok


# ----------------------------------------------------------------------------------------------
# the registry table
# ----------------------------------------------------------------------------------------------

def _defaults(cls) -> str:
    parts = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            v = f.default
        elif f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        else:
            parts.append(f"{f.name} (required)")
            continue
        parts.append(f"{f.name}={v!r}")
    return ", ".join(parts)


def registry_rows() -> list[dict]:
    """One row per registered method (prefill, decode, train; by name within a phase), from the class alone."""
    from sparsattn.methods import list_methods, method_class
    from sparsattn.methods.base import Method

    rows = []
    for phase in ("prefill", "decode", "train"):
        for name in list_methods(phase):
            cls = method_class(name)
            ph = phase + (" (computes its output: `Method.attend`, no pattern)" if cls.attend is not Method.attend else "")
            cal = "no"
            if cls.needs:
                kind = getattr(cls, "calibration_kind", "")
                cal = f"{', '.join(cls.needs)} ({kind}{'; ' if kind else ''}`sparsattn calibrate {name}`)"
            rows.append({"method": name, "paper": cls.paper, "phase": ph, "calibration": cal,
                         "defaults": _defaults(cls)})
    return rows


def registry_table() -> str:
    """The markdown table of ``registry_rows`` (header, rule and one line per method)."""
    lines = ["| method | paper (arXiv) | phase | calibration | defaults |", "|---|---|---|---|---|"]
    for r in registry_rows():
        cells = [f"`{r['method']}`", r["paper"], r["phase"], r["calibration"], r["defaults"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _table_span(text: str) -> tuple[int, int]:
    """(start, end) offsets of the registry table in ``docs/methods.md`` (ValueError when absent)."""
    head = "| method | paper (arXiv) |"
    start = text.find(head)
    if start < 0:
        raise ValueError(f"doc: no registry table (a line starting {head!r}) in {DOC}")
    end = text.find("\n\n", start)
    return start, (len(text) if end < 0 else end)


def registry(write: bool = False, check: bool = False, doc: Path = DOC) -> int:
    """Print the registry table; ``write``: replace it in ``doc``; ``check``: 1 when ``doc`` differs."""
    table = registry_table()
    text = Path(doc).read_text()
    a, b = _table_span(text)
    same = text[a:b] == table
    if write and not same:
        Path(doc).write_text(text[:a] + table + text[b:])
        print(f"wrote the registry table of {doc}")
    elif check:
        print(f"{doc}: registry table {'up to date' if same else 'differs from the registry'}")
        return 0 if same else 1
    else:
        print(table)
    return 0


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------

def _parse_sets(items) -> dict:
    """``["moa.samples_per_length=2", ...]`` -> ``{"moa": {"samples_per_length": 2}}`` (values as JSON, else str)."""
    out: dict = {}
    for it in items or []:
        key, sep, val = it.partition("=")
        name, dot, opt = key.partition(".")
        if not (sep and dot and name and opt):
            raise SystemExit(f"--set: expected METHOD.OPTION=VALUE, got {it!r}")
        try:
            v = json.loads(val)
        except json.JSONDecodeError:
            v = val
        out.setdefault(name, {})[opt] = v
    return out


def shipped_calibrations() -> dict:
    """{method: path} of the calibrations shipped with the bundled model (the calibrated methods'
    default output files that exist)."""
    from sparsattn.calibrate import calibrated_methods, calibrator, shipped_dir

    out = {}
    for name in calibrated_methods():
        path = shipped_dir() / calibrator(name).OUT
        if path.exists():
            out[name] = str(path)
    return out


def calibrate(which: list[str], options: dict) -> None:
    """Regenerate calibrations: one ``sparsattn calibrate <method>`` per entry of ``which`` (default:
    every calibrated method whose shipped file exists) with ``options[method]``; each updates
    provenance.json."""
    from sparsattn.calibrate import calibrate as run_calibration

    for name in which or sorted(shipped_calibrations()):
        m, rec = run_calibration(name, **options.get(name, {}))
        print(f"{name}: {m.path} ({rec['seconds']} s)")


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------

def preset_context(calibrations=None, **fields):
    """The ``PresetContext`` of the bundled model (8 layers, 8 query heads, 2 KV heads, block 64) with
    the shipped calibrations, overridden by ``calibrations`` ({method: path}) and ``fields`` (e.g.
    ``work_dir``, where a preset writes derived calibrations)."""
    from sparsattn.methods.base import PresetContext

    cfg = json.loads((Path(bundled_path()) / "config.json").read_text())
    kw = dict(n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
              group_size=cfg["num_attention_heads"] // cfg["num_key_value_heads"], block_size=64)
    kw.update(fields)
    return PresetContext(calibrations={**shipped_calibrations(), **(calibrations or {})}, **kw)


def settings(quick: bool, *, T: int = 4096, ctx=None, targets=TARGETS, reference: bool = True) -> list[tuple]:
    """(method, label, config) per row: the reference row (config None: the unpatched model), then per
    registered prefill method its fixed settings and its density preset at each target (the knob's
    first guess at length ``T``). ``quick``: one setting per method."""
    from sparsattn.methods import list_methods, method_class

    ctx = ctx if ctx is not None else preset_context()
    s = [REFERENCE] if reference else []
    for name in list_methods("prefill"):
        cls = method_class(name)
        rows = []
        try:
            for fs in cls.fixed_settings(T, ctx):
                rows.append((name, fs.label, dict(fs.config)))
            for d in targets:
                knob = cls.density_knob(T, d, ctx)
                if knob is not None:
                    rows.append((name, f"d{d:g}: {knob.label(knob.guess)}", knob.config(knob.guess)))
        except (ValueError, OSError) as e:  # e.g. a calibration neither shipped nor given
            print(f"skip {name}: {e}")
            continue
        if not rows:
            print(f"skip {name}: no fixed setting and no density preset")
        s += rows
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
            ctx = SelectContext(layer=l, causal=True, scale=scales[l], q_offset=0, state=state, phase="prefill",
                                padding_side="right", num_kv_groups=q.shape[1] // k.shape[1],
                                q_pre_rope=qp, k_pre_rope=kp, v=v)
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
    cals = dict(c.split("=", 1) for c in args.calibration or [])
    work = tempfile.TemporaryDirectory(prefix="methods_table_")  # derived calibrations (e.g. retrieval-head subsets)
    setups = settings(args.quick, T=args.length, ctx=preset_context(cals, n_layers=n_layers, work_dir=work.name))
    if args.methods:
        keep = set(args.methods.split(","))
        setups = [s for s in setups if s[0] in keep or s[2] is None]  # the reference row always
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
            m = None if cfg is None else get_method(name, **cfg)
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
        r["config"] = json.dumps({k: (Path(v).name if k.endswith("path") and isinstance(v, str) else v)
                                  for k, v in (cfg or {}).items()}, sort_keys=True, default=str)
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    rg = sub.add_parser("registry", help="the registered-methods table of docs/methods.md, from the registry")
    rg.add_argument("--write", action="store_true", help="replace the table in docs/methods.md")
    rg.add_argument("--check", action="store_true", help="exit 1 when docs/methods.md's table differs")
    c = sub.add_parser("calibrate", help="regenerate the shipped calibrations (sparsattn calibrate <method>)")
    c.add_argument("--which", default="", help="comma list of calibrated methods (default: those shipped)")
    c.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="an option of one method's calibration (see `sparsattn calibrate METHOD --help`)")
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
        p.add_argument("--methods", default="", help="comma list to restrict (the reference row always kept)")
        p.add_argument("--no-passkey", action="store_true")
        p.add_argument("--no-fidelity", action="store_true")
        p.add_argument("--max-new-tokens", type=int, default=12)
        p.add_argument("--out-csv", default=str(OUT_CSV))
        p.add_argument("--out-png", default=str(OUT_PNG))
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--fid-rows", type=int, default=1024, help="fidelity on the last this many query rows (0 = all)")
        p.add_argument("--resume", action="store_true", help="keep rows already in the CSV, run the others")
        p.add_argument("--calibration", action="append", default=[], metavar="METHOD=PATH",
                       help="a calibration to use instead of the shipped one (repeatable)")
    a = ap.parse_args(argv)
    torch.set_num_threads(getattr(a, "threads", 2))
    if a.cmd == "registry":
        return registry(write=a.write, check=a.check)
    if a.cmd == "merge":
        merge(a.fid_csv, a.pk_csv, a.out_csv, a.out_png, a.title)
    elif a.cmd == "calibrate":
        calibrate([w.strip() for w in a.which.split(",") if w.strip()], _parse_sets(a.set))
    else:
        if a.cmd is None:
            a = ap.parse_args(["table"] + list(argv or sys.argv[1:]))
        table(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
