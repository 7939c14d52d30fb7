"""Plots of the decode quality driver: accuracy or top-10 recall against the token budget."""
from __future__ import annotations

from pathlib import Path

from ._harness import pyplot, save_figure



# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------

def plot_vs_budget(rows: list[dict], path, metric: str = "accuracy") -> Path:
    """plot_vs_budget: a panel per length, ``metric`` ("accuracy", "top10_recall" or "needle_coverage") against the token
    budget (log2 axis), a line per method; dense accuracy as a horizontal dashed line."""
    plt = pyplot()
    if metric not in ("accuracy", "top10_recall", "needle_coverage"):
        raise ValueError(f"metric: expected 'accuracy', 'top10_recall' or 'needle_coverage', got {metric!r}")
    from .decode_run import AllTokens  # the unregistered dense-kernel reference row

    lengths = sorted({r["length"] for r in rows})
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("dense", AllTokens.name)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 3.9), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for mi, m in enumerate(methods):
            rs = sorted((r for r in rows if r["method"] == m and r["length"] == L and r["budget"] != "full"
                         and r.get(metric) is not None), key=lambda r: r["budget_tokens"])
            dodge = 2 ** (0.04 * (mi - (len(methods) - 1) / 2))  # overlapping lines stay visible (log axis)
            if rs:
                ax.plot([r["budget_tokens"] * dodge for r in rs], [r[metric] for r in rs], marker=markers[mi % len(markers)],
                        ms=4, lw=1.2, alpha=0.85, color=colors[mi % len(colors)], label=m)
            fr = next((r for r in rows if r["method"] == m and r["length"] == L and r["budget"] == "full"
                       and r.get(metric) is not None), None)
            if fr is not None:  # the full-budget point, at the context length
                ax.scatter([L], [fr[metric]], marker="*", s=60, color=colors[mi % len(colors)], edgecolors="k",
                           linewidths=0.4)
        d = next((r for r in rows if r["method"] == "dense" and r["length"] == L), None)
        if metric == "accuracy" and d is not None:
            ax.axhline(d["accuracy"], color="k", ls="--", lw=1, label=f"dense ({d['accuracy']:.0f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token budget per KV head (* = full; x dodged)")
        ax.set_ylabel({"accuracy": "passkey accuracy (x100)", "top10_recall": "top-10 recall (teacher-forced steps)",
                       "needle_coverage": "needle coverage (reading heads keeping it)"}[metric])
        ax.set_ylim(-5, 105) if metric == "accuracy" else ax.set_ylim(-0.03, 1.03)
        nn = sorted({r["n"] for r in rows if r["length"] == L})
        ax.set_title(f"passkey, {L} tokens (n={'/'.join(map(str, nn))})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
