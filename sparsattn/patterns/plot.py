"""Patterns: drawing a pattern as a PNG."""
from __future__ import annotations

from typing import Optional, Sequence

from ._util import _cdiv, _err
from .block import BlockPattern
from .token import TokenPattern


def plot(pattern, path, *, heads: Optional[Sequence[int]] = None, batch: int = 0, max_px: int = 512,
         title: Optional[str] = None):
    """plot: write a PNG of the pattern's element mask per head (block view for long sequences).

    For ``q_len, kv_len <= max_px`` every pixel is one (query, key) pair; otherwise each pixel is
    one block, shaded by its kind (full, partial) and columns are drawn as lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(pattern, TokenPattern):
        img = pattern.to_token_mask()[batch].float().cpu()
        fig, ax = plt.subplots(figsize=(8, 0.3 * img.shape[0] + 1))
        ax.imshow(img, aspect="auto", interpolation="nearest", cmap="Blues")
        ax.set_xlabel("key position")
        ax.set_ylabel("head")
        ax.set_title(title or f"TokenPattern density={pattern.density:.3f}")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path
    if not isinstance(pattern, BlockPattern):
        raise _err("pattern", "a BlockPattern or TokenPattern", type(pattern))
    H = pattern.heads
    heads = list(range(min(H, 8))) if heads is None else list(heads)
    for h in heads:
        if not 0 <= h < H:
            raise _err("heads", f"indices in [0, {H})", h)
    small = pattern.q_len <= max_px and pattern.kv_len <= max_px
    ncol = min(4, len(heads))
    nrow = _cdiv(len(heads), ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.2 * nrow), squeeze=False)
    b = min(batch, pattern.batch - 1)
    if small:
        mask = pattern.to_dense_mask()[b].float().cpu()
    else:
        full = pattern.full_sel()[b].float().cpu()
        part = pattern.partial_sel()[b].float().cpu()
        mask = full + 0.5 * part
    for n, h in enumerate(heads):
        ax = axes[n // ncol][n % ncol]
        ax.imshow(mask[h], cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        if not small and pattern.columns is not None:
            ch = h if pattern.columns.heads == H else 0
            cb = min(b, pattern.columns.batch - 1)
            cols = pattern.columns.indices[cb, ch, : int(pattern.columns.counts[cb, ch])].cpu()
            for c in cols[:2000]:
                ax.axvline(float(c) / pattern.block_k, color="orange", lw=0.3, alpha=0.5)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for n in range(len(heads), nrow * ncol):
        axes[n // ncol][n % ncol].axis("off")
    unit = "element" if small else f"block {pattern.block_q}x{pattern.block_k} (dark=full, light=partial)"
    fig.suptitle(title or f"{unit}; density {pattern.density:.3f}", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
