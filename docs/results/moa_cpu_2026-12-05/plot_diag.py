"""plot_diag: predicted (first-order, |E| and signed) vs measured loss increase of cutting one head to
sink 32 + span 32, per head, from ``diagnose_1024.json``; writes the PNG and a CSV of the numbers.

``python docs/results/moa_cpu_2026-12-05/plot_diag.py``
"""
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
READERS = {(6, 1), (6, 2), (7, 4), (7, 5), (7, 6), (7, 7)}


def main():
    d = json.loads((HERE / "diagnose_1024.json").read_text())
    rows = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for p in d["prompts"]:
        for l in range(8):
            for h in range(8):
                rows.append({"depth": p["depth"], "layer": l, "head": h, "needle_mass": round(p["needle_mass"][l][h], 4),
                             "pred_abs": p["pred_loss_at_span"][l][h], "pred_signed": p["pred_loss_at_span_signed"][l][h],
                             "measured": p["measured_loss_at_span"][l][h], "dense_loss": p["dense_loss"]})
    for ax, key, name in ((axes[0], "pred_abs", "|E| (MoA)"), (axes[1], "pred_signed", "signed E")):
        for r in rows:
            reader = (r["layer"], r["head"]) in READERS
            c = "red" if reader else ("tab:blue" if r["layer"] == 0 else "grey")
            ax.scatter(abs(r[key]), r["measured"], s=10, c=c, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel(f"predicted loss of span 32, {name}")
        ax.set_title(name, fontsize=9)
    axes[0].set_ylabel("measured loss increase (one head cut)")
    fig.suptitle("bundled model, 1K passkey prompts (3 depths): red = needle readers, blue = layer 0, grey = others",
                 fontsize=9)
    fig.savefig(HERE / "diagnosis_1024.png", dpi=110, bbox_inches="tight")
    with open(HERE / "diagnose_1024.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", HERE / "diagnosis_1024.png")


if __name__ == "__main__":
    main()
