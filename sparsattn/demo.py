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

Method configurations are the papers' defaults scaled from 32K-128K contexts down to 4K-8K so
that every method computes roughly 10-25 % of the causal pairs (measured densities are in the
table; ``DEMO_METHODS`` gives each choice and its reason). On the CPU the sparse methods run
through the plain-torch reference kernel (the Triton interpreter is switched off for the run).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

#: method -> hyper-parameters for 4K-8K contexts (block 64 everywhere, the kernels' block size)
DEMO_METHODS: dict[str, dict] = {
    "dense": {},
    # StreamingLLM/LM-Infinite "A-shape" (MInference, arXiv 2407.02490): 64 sink + 448 local tokens
    # = 512 keys per row: ~23 % of causal pairs at 4K, ~12 % at 8K (paper: 128 + 3968 at 128K)
    "a_shape": {"n_init": 64, "n_local": 448},
    # S2-Attention (arXiv 2407.17678): 4 local blocks + every 8th block, heterogeneous shards
    # across heads: ~23 % at 4K, ~18 % at 8K (paper: 16 local blocks at 32K+)
    "s2_attention": {"local_blocks": 4, "vert_stride": 8},
    # MInference vertical-slash (arXiv 2407.02490): 64 columns + 48 diagonals (32 of them the local
    # band), estimated from the last 64 queries (paper: 1000 + 6096 at 128K). Slashes are covered by
    # whole key blocks, so few diagonals already cost a lot: measured on the bundled model at 4K,
    # 256 + 128 gave 47 % density, 128 + 64 about 35 %, 64 + 48 about 23 % (layers 0 / 4 / 7)
    "vertical_slash": {"v_size": 64, "s_size": 48, "n_local": 32, "n_sink": 16},
    # MInference block-sparse (arXiv 2407.02490): 8 key blocks of 64 per query block: ~22 % at
    # 4K, ~11 % at 8K (paper: top-100 blocks at 128K)
    "block_sparse": {"top_k": 8},
}
# (oracle_topk is left out: it computes exact block scores at every layer, which alone would exceed
# the demo's CPU budget at 4K-8K; run it with ``sparsattn eval --methods dense,oracle_topk``.)


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
               methods: dict | None = None, progress: bool = True) -> int:
    """model_demo: dense vs training-free sparse prefill methods on the bundled model (passkey + fidelity).

    Args:
        out_dir: folder for demo.png, eval.csv, eval_samples.csv and the eval PNGs.
        quick: 4K only, 1 sample (smoke test); otherwise 4K and 8K with 2 samples each.
        model_path: another local checkpoint (default: the bundled one).
        lengths, n_samples, methods: overrides ({name: config} for methods), mainly for tests.
        progress: tqdm bars.
    Returns:
        0 (the exit status of ``sparsattn demo``).
    """
    from .bench.common import print_table
    from .evaluate import run_eval

    out_dir = Path(out_dir)
    methods = dict(DEMO_METHODS if methods is None else methods)
    if lengths is None:
        lengths = [4096] if quick else [4096, 8192]
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
        forced = _teacher_forced_passkey(model_path, methods, lengths, n_samples, device)
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
    cols = [c for c in table[0] if not c.startswith("_")]
    print_table(table, cols, title=f"sparsattn demo: passkey retrieval, {n_samples} sample(s) per length "
                                   f"({device}, {secs:.0f} s)")
    for c in cols:
        print(f"  {c}: {COLUMN_NOTES[c]}")
    for line in ruler_differs:
        print(f"  note: {line}")
    png = _plot(table, out_dir / "demo.png")
    print(f"wrote {png}, {out_dir / 'eval.csv'} (RULER scores), {out_dir / 'eval_samples.csv'} (answers)")
    return 0


def _teacher_forced_passkey(model_path, methods: dict, lengths, n_samples: int, device: str) -> dict:
    """``{(method, length): {"correct", "n", "tokens_right", "tokens"}}`` of the passkey decided by the
    sparse prefill: prompt and gold answer in one forward of the patched model; a sample is correct
    iff every answer token is the argmax (``sparsattn.eval.prefill_quality``), ``tokens_right``
    counts the answer tokens that are. The generated passkey of ``run_eval`` reads the needle
    through dense decode attention after its first token, so it hardly depends on the method."""
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
            dense = name == "dense" and not cfg
            ctx = contextlib.nullcontext() if dense else patched(model, method=get_method(name, **cfg))
            with ctx:
                res = [score_teacher_forced(teacher_forced_predict(model, p, a, device), a) for p, a in pairs]
            out[(name, int(L))] = {"correct": sum(r["correct"] for r in res), "n": len(res),
                                   "tokens_right": sum(sum(r["hits"]) for r in res),
                                   "tokens": sum(len(r["hits"]) for r in res)}
    return out


__all__ = ["model_demo", "DEMO_METHODS", "COLUMN_NOTES"]
