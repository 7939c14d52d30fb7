"""demo: the main job of ``sparsattn demo`` on the bundled model: dense vs training-free sparse prefill methods.

Passkey retrieval (RULER niah_single, Hsieh et al., arXiv 2404.06654) at 4K tokens (and 8K unless
``quick``) on the bundled long-context model, dense attention against five registered prefill
methods that need no fitting, plus fidelity against dense attention on q/k/v captured from one
prompt per length. Runs ``sparsattn.evaluate.run_eval`` underneath; prints ONE table (a line of
explanation per column under it) and writes ``demo.png`` (answer tokens right vs density, attention
recall vs density), ``eval.csv`` and the eval PNGs. The table also has the passkey *decided by the
sparse prefill* (teacher forcing: prompt + gold answer in one sparse forward, every answer token
must be the argmax), because a generated answer reads the needle through dense decode attention
after its first token.

Passkeys are scored exactly (``sparsattn.eval.scoring.exact_match_all``: the number as a whole
token; RULER's substring match would also count ``72894720`` for ``7289472``; ``eval.csv`` keeps
RULER's score for comparability, and the table notes any row where the two differ). Counts are
printed as ``right/samples`` so that one or two samples are not read as a percentage.

Method configurations come from each method's own ``density_knob`` preset aimed at 20 % of the
causal pairs at the first passkey length (``demo_configs``; measured densities are in the table).
On the CPU the sparse attention runs through the backend the table picks automatically: compiled
FlexAttention from 2048 tokens (``kernels/backends.py``), the plain-torch reference for shorter
inputs and for patterns with token columns (the Triton interpreter is switched off for the run).

The table also shows the prefill time dense vs each method, measured in the same run: one full
forward of an 8K-token prompt (and 16K with ``--full``) per method (``sparsattn.demo_speed``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

def _demo_methods() -> tuple:
    """The registered prefill methods that declare ``demo = True`` (the exact baseline first): dense and
    training-free methods that are fast on the CPU (oracle_topk computes exact block scores at every
    layer, which alone would exceed the demo's CPU budget; run it with ``sparsattn eval --methods
    dense,oracle_topk``)."""
    from .methods import list_methods, method_class

    names = [n for n in list_methods("prefill") if method_class(n).demo]
    return tuple(sorted(names, key=lambda n: (not method_class(n).exact, n)))


#: the methods the demo compares (read from the registry: ``Method.demo``). Their settings come from
#: each method's own ``density_knob`` preset aimed at ``DEMO_DENSITY`` (``demo_configs``).
DEMO_METHODS: tuple = _demo_methods()
#: the density the methods' presets aim at (share of causal query-key pairs; PERF.md target 7: ~20 %)
DEMO_DENSITY = 0.2


def _unpatched(name: str, cfg: dict) -> bool:
    """An exact method with its defaults runs as the unpatched model (the baseline)."""
    from .methods import method_class

    return not cfg and method_class(name).exact


def demo_configs(T: int, target: float = DEMO_DENSITY, names=DEMO_METHODS, ctx=None) -> dict:
    """demo_configs: ``{method: config}`` for the demo at length ``T``: each method's ``density_knob``
    preset aimed at ``target`` density, taken at its first guess (no search: the measured density is
    in the table); methods without a knob (dense) run with their defaults ({})."""
    from .methods import method_class
    from .methods.base import PresetContext

    ctx = ctx or PresetContext()
    out = {}
    for name in names:
        knob = method_class(name).density_knob(int(T), float(target), ctx)
        out[name] = {} if knob is None else knob.config(knob.guess)
    return out


COLUMN_NOTES: dict[str, str] = {
    "method": "registered method (sparsattn list); dense = the unpatched model",
    "tokens": "prompt length in tokens (RULER niah_single passkey; the needle at a depth swept over the samples)",
    "passkey generated": "samples whose greedy answer holds the passkey as a whole token; sparse prefill, "
                         "then dense decode attention",
    "passkey sparse-decided": "samples whose every answer token is the argmax of ONE sparse forward over "
                              "prompt + answer (teacher forcing)",
    "answer tokens": "answer tokens predicted right in that forward, over all samples (a graded view of "
                     "the previous column)",
    "density": "computed / causal query-key pairs of the prefill, mean over layers and prompts (1 = dense)",
    "recall": "share of dense attention mass inside the pattern (fidelity prompt, first/middle/last layer, "
              "last 512 query rows)",
    "top10 recall": "share of each row's 10 largest dense attention weights kept by the pattern (same rows)",
    "rel error": "||sparse - dense|| / ||dense|| of the attention output (same rows)",
}


def speed_notes(lengths) -> dict[str, str]:
    """Column name -> note of the prefill-speed columns for the timed lengths."""
    notes = {}
    for T in lengths:
        notes[f"prefill {T // 1024}K s"] = (f"seconds of ONE full forward of a {T}-token prompt (selection + attention + "
                                            "MLPs), measured in this run; same for every row of a method")
        notes[f"speed-up {T // 1024}K"] = f"dense prefill time / the method's, at {T} tokens (> 1 = faster than dense)"
    notes["backend"] = ("kernel backend that ran the sparse attention (the automatic choice: flex = compiled "
                        "FlexAttention on the CPU; reference when the pattern has token columns)")
    return notes


def _plot(table: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in table))
    lengths = sorted({r["tokens"] for r in table})
    markers = "osD^"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    panels = (
        (axes[0], "_tok_pct", "_density_pct", "prefill density (% of causal query-key pairs computed)",
         "answer tokens right, sparse-decided (% of answer tokens)",
         "passkey decided by the sparse prefill (teacher forcing)"),
        (axes[1], "_recall_pct", "_fid_density_pct", "density on the fidelity rows (% of causal pairs)",
         "attention recall (% of dense attention mass kept)", "fidelity: first / middle / last layer, last 512 rows"),
    )
    for ax, ykey, xkey, xlabel, ylabel, title in panels:
        for mi, m in enumerate(methods):
            for li, L in enumerate(lengths):
                r = next((r for r in table if r["method"] == m and r["tokens"] == L), None)
                if r is None or r.get(ykey) is None or r.get(xkey) is None:
                    continue
                ax.scatter(r[xkey], r[ykey], color=colors[mi % len(colors)], marker=markers[li % len(markers)], s=60,
                           edgecolors="k", linewidths=0.4, label=m if li == 0 else None)
        ax.set_xlim(0, 105)
        ax.set_ylim(-5, 105)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_title(title + "\nmarker = prompt length: " + ", ".join(
            f"{markers[i % len(markers)]} {L} tokens" for i, L in enumerate(lengths)), fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("bundled model: sparse prefill methods vs dense attention (passkey retrieval)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _generated_counts(samples_csv: Path) -> dict:
    """``{(method, length): (exact right, RULER right, samples)}`` from run_eval's ``eval_samples.csv``:
    each generated answer re-scored with the exact (token-boundary) passkey match."""
    import csv

    from .eval.scoring import exact_match_all, string_match_all

    out: dict = {}
    with open(samples_csv, newline="") as fh:
        for r in csv.DictReader(fh):
            answers = [a for a in r["answers"].split(" | ") if a]
            key = (r["method"], int(r["length"]))
            ex, ru, n = out.get(key, (0, 0, 0))
            out[key] = (ex + int(exact_match_all(r["prediction"], answers) == 1.0),
                        ru + int(string_match_all(r["prediction"], answers) == 1.0), n + 1)
    return out


def _pct(x) -> float | None:
    return None if x is None else 100.0 * float(x)


def model_demo(out_dir: Path, quick: bool = False, *, model_path=None, lengths=None, n_samples=None,
               methods: dict | None = None, speed_lengths=None, progress: bool = True) -> int:
    """model_demo: dense vs training-free sparse prefill methods on the bundled model (passkey, fidelity,
    and the prefill time dense vs sparse measured in the same run).

    Args:
        out_dir: folder for demo.png, eval.csv, eval_samples.csv and the eval PNGs.
        quick: 4K only, 1 sample, prefill timed at 8K; otherwise 4K and 8K with 2 samples each,
            prefill timed at 8K and 16K.
        model_path: another local checkpoint (default: the bundled one).
        lengths, n_samples, methods, speed_lengths: overrides ({name: config} for methods; default
            ``demo_configs(lengths[0])``; ``speed_lengths=[]`` skips the timing), mainly for tests.
        progress: tqdm bars.
    Returns:
        0 (the exit status of ``sparsattn demo``).
    """
    from .bench.common import print_table
    from .evaluate import run_eval

    out_dir = Path(out_dir)
    if lengths is None:
        lengths = [4096] if quick else [4096, 8192]
    methods = dict(demo_configs(lengths[0]) if methods is None else methods)
    if speed_lengths is None:
        speed_lengths = [8192] if quick else [8192, 16384]
    if n_samples is None:
        n_samples = 1 if quick else 2
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The CLI turns on the Triton interpreter for the kernel demo; at 4K-8K tokens it is far too slow
    # on the CPU, and the plain-torch reference computes exactly the same patterns.
    saved = os.environ.get("TRITON_INTERPRET")
    if device == "cpu" and saved == "1":
        os.environ["TRITON_INTERPRET"] = "0"
    t0 = time.perf_counter()
    try:
        rows = run_eval(model_path, methods=list(methods), tasks=["passkey"], lengths=list(lengths),
                        n_samples=n_samples, method_config={k: v for k, v in methods.items() if v},
                        out_dir=out_dir, device=device, batch_size=n_samples, progress=progress, fidelity=True,
                        fidelity_rows=512, show=False)
        forced, speed = _teacher_forced_passkey(model_path, methods, lengths, n_samples, device,
                                                speed_lengths=speed_lengths, progress=progress)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    secs = time.perf_counter() - t0
    gen = _generated_counts(out_dir / "eval_samples.csv")
    table, ruler_differs = [], []
    for r in rows:
        key = (r["method"], int(r["length"]))
        ex, ru, n = gen.get(key, (None, None, None))
        f = forced.get(key)
        if ex is not None and ex != ru:
            ruler_differs.append(f"{key[0]} at {key[1]}: {ru}/{n} by RULER's substring match, {ex}/{n} exact")
        table.append({
            "method": r["method"], "tokens": int(r["length"]),
            "passkey generated": None if ex is None else f"{ex}/{n}",
            "passkey sparse-decided": None if f is None else f"{f['correct']}/{f['n']}",
            "answer tokens": None if f is None else f"{f['tokens_right']}/{f['tokens']}",
            "density": r["density"], "recall": r["recall"], "top10 recall": r["topk_recall"],
            "rel error": r["rel_error"],
            "_tok_pct": None if f is None else 100.0 * f["tokens_right"] / f["tokens"],
            "_density_pct": _pct(r["density"]), "_recall_pct": _pct(r["recall"]),
            "_fid_density_pct": _pct(r.get("fid_density")),
        })
        for T in speed_lengths:
            sp = speed.get((r["method"], T), {})
            table[-1][f"prefill {T // 1024}K s"] = None if not sp or sp["seconds"] is None else round(sp["seconds"], 2)
            table[-1][f"speed-up {T // 1024}K"] = None if not sp or sp["speedup"] is None else f"{sp['speedup']:.2f}x"
        if speed_lengths:
            be = speed.get((r["method"], speed_lengths[0]), {}).get("backend")
            table[-1]["backend"] = be.split(" (")[0] + " (not timed)" if be and "not timed" in be else be
    notes = {**COLUMN_NOTES, **speed_notes(speed_lengths)}
    cols = [c for c in table[0] if not c.startswith("_")]
    print_table(table, cols, title=f"sparsattn demo: passkey retrieval, {n_samples} sample(s) per length "
                                   f"({device}, {secs:.0f} s)")
    for c in cols:
        print(f"  {c}: {notes[c]}")
    for (m, T), sp in speed.items():
        if m != "_compile" and "not timed" in str(sp.get("backend")):
            print(f"  note: {m} at {T} tokens: {sp['backend']}")
    compiled = {T: s for (m, T), s in speed.items() if m == "_compile" and s}
    for T, s in compiled.items():
        print(f"  note: FlexAttention compiled for {T} tokens in {s:.0f} s before the timed prefills (once per "
              "input shape; Inductor keeps it on disk for later runs)")
    for line in ruler_differs:
        print(f"  note: {line}")
    png = _plot(table, out_dir / "demo.png")
    print(f"wrote {png}, {out_dir / 'eval.csv'} (RULER scores), {out_dir / 'eval_samples.csv'} (answers)")
    return 0


def _teacher_forced_passkey(model_path, methods: dict, lengths, n_samples: int, device: str, *,
                            speed_lengths=(), progress: bool = False) -> tuple[dict, dict]:
    """``({(method, length): {"correct", "n", "tokens_right", "tokens"}}, speed)`` of the passkey decided
    by the sparse prefill: prompt and gold answer in one forward of the patched model; a sample is
    correct iff every answer token is the argmax (``sparsattn.eval.prefill_quality``), ``tokens_right``
    counts the answer tokens that are. The generated passkey of ``run_eval`` reads the needle
    through dense decode attention after its first token, so it hardly depends on the method.
    ``speed``: ``sparsattn.demo_speed.prefill_speed`` at ``speed_lengths`` on the same loaded model."""
    import contextlib

    from .eval.teacher_forced import score_teacher_forced, teacher_forced_ids, teacher_forced_predict
    from .eval.tasks import make_samples
    from .evaluate import load_model
    from .integrations.hf import patched
    from .methods import get_method

    model, tok, _ = load_model(model_path, device=device)
    out: dict = {}
    for L in lengths:
        # prompts 16 tokens short of L, so that prompt + answer fits the same length
        samples = make_samples("passkey", tok, L - 16, n_samples, seed=7919, progress=False)
        try:
            pairs = [teacher_forced_ids(tok, s.prompt, s.answers[0]) for s in samples]
        except ValueError as e:  # a tokenizer that merges across the answer boundary: say so, skip
            print(f"note: no sparse-decided passkey at {L} tokens ({e})")
            continue
        for name, cfg in methods.items():
            dense = _unpatched(name, cfg)
            ctx = contextlib.nullcontext() if dense else patched(model, method=get_method(name, **cfg))
            with ctx:
                res = [score_teacher_forced(teacher_forced_predict(model, p, a, device), a) for p, a in pairs]
            out[(name, int(L))] = {"correct": sum(r["correct"] for r in res), "n": len(res),
                                   "tokens_right": sum(sum(r["hits"]) for r in res),
                                   "tokens": sum(len(r["hits"]) for r in res)}
    speed = {}
    if speed_lengths:
        from .demo_speed import prefill_speed

        speed = prefill_speed(model, tok, methods, [int(T) for T in speed_lengths], progress=progress)
    return out, speed


__all__ = ["model_demo", "DEMO_METHODS", "DEMO_DENSITY", "COLUMN_NOTES", "demo_configs", "speed_notes"]
