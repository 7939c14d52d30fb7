"""Plot the SeerAttention gate's per-layer block recall against the oracle, before/after (issue 21).

Usage: python docs/results/seer_gate_cpu_2026-12-05/plot_recall.py OUT.png LABEL=check_X.json ...
Each check_*.json (``python -m sparsattn.calibrate.check ... --recall-for SPEC``) holds
``extra.gate_block_recall.per_layer``; one group of bars per file, one bar per layer (left). Right: per
layer, the share of the needle-reading heads whose needle the gate's pattern kept, from the ``heads``
of the row measured for the same gate spec (the heads that read the needle are all in layers 6-7).
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv):
    out, specs = argv[0], [a.split("=", 1) for a in argv[1:]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(1, len(specs))
    for i, (label, path) in enumerate(specs):
        doc = json.loads(Path(path).read_text())
        r = doc["extra"]["gate_block_recall"]
        per = r["per_layer"]
        ax.bar([l + (i - (len(specs) - 1) / 2) * width for l in range(len(per))], per, width,
               label=f"{label} (k={r['k_per_row']}, {r['prompts']} prompts)")
        row = next(x for x in doc["rows"] if x["method"] == r["gate"])
        layers = sorted({h[0] for p in row["heads"] for h in p})
        kept = [sum(h[2] for p in row["heads"] for h in p if h[0] == l) for l in layers]
        read = [sum(1 for p in row["heads"] for h in p if h[0] == l) for l in layers]
        xs = [j + (i - (len(specs) - 1) / 2) * width for j in range(len(layers))]
        ax2.bar(xs, [k / n for k, n in zip(kept, read)], width,
                label=f"{label}: {row['correct']}/{row['n']} passkey at {row['density']:.3f}")
        for x, k, n in zip(xs, kept, read):
            ax2.text(x, k / n + 0.02, f"{k}/{n}", ha="center", fontsize=7)
        ax2.set_xticks(range(len(layers)), [str(l) for l in layers])
    ax2.set_xlabel("layer")
    ax2.set_ylabel("needle kept / reading heads")
    ax2.set_ylim(0, 1.15)
    ax2.legend(fontsize=7, loc="lower right")
    ax2.set_title(f"needle kept in the heads that read it ({row['n']} prompts, T={row['length']})", fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("block recall vs oracle top-k")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("SeerAttention gate: share of the oracle's top-k key blocks the gate ranks in its top-k", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
