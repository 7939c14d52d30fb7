"""plot: per-head span (share of the context) at 4K of MoA plans, the heads that read the needle boxed.

``python docs/results/moa_cpu_2026-12-05/plot.py OUT.png LABEL=PLAN.json[@BUDGET] ...``
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from sparsattn.methods.moa import MoA, span_density  # noqa: E402

READERS = [(6, 1), (6, 2), (7, 4), (7, 5), (7, 6), (7, 7)]  # read the needle at 4K (issue 21 status)
N = 4096


def main(out, specs):
    fig, axes = plt.subplots(1, len(specs), figsize=(3.6 * len(specs), 3.8), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        label, _, rest = spec.partition("=")
        path, _, b = rest.partition("@")
        m = MoA(path=path, budget=float(b) if b else None)
        L = m.plan["shape"].num_layers
        share = [[float(s) / N for s in m.spans(l, N)] for l in range(L)]
        dens = sum(float(span_density(m.spans(l, N), m.plan["sink"], N).mean()) for l in range(L)) / L
        im = ax.imshow(share, vmin=0, vmax=1, cmap="viridis", origin="upper")
        for l, h in READERS:
            ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_title(f"{label}\ndensity {dens:.3f} at 4K", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="span / N at N = 4096")
    fig.suptitle("MoA spans per head (red: heads that read the needle at 4K)", fontsize=10)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
