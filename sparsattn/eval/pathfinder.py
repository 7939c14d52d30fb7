"""Pathfinder: an offline, seeded generator of LRA Pathfinder-style images (Linsley et al. 2018,
"Learning long-range spatial dependencies with horizontal gated recurrent units", arXiv 1805.08315;
Long Range Arena, Tay et al., arXiv 2011.04006).

Each image (``size x size``, default 32, uint8, black background) holds ``n_paths`` dashed smooth
curves and two square markers. Label 1: the markers sit on the two ends of one curve; label 0: they
sit on one end of each of two different curves. Both classes have the same number of curves (the
unmarked ones are distractors), and labels are exactly balanced.

How a curve is made (all examples at once, numpy, no Python loop over examples or samples): a start
point uniform inside a margin, a uniform start direction, ``path_len / step`` steps of ``step``
pixels whose direction turns by a Gaussian of ``turn_std`` radians per step (smooth, random
curvature), reflected at the borders. Samples whose arc position ``s`` has
``s mod (dash_len + gap_len) < dash_len`` are inked (the dashes), the end points always.

Connectivity (what the label means): two ink pixels are linked when their Chebyshev distance is at
most ``reach = ceil(gap_len + 2 * step)`` (a rasterised gap between dashes is never wider; see
``reach``). Every candidate image is flood-filled from one marker over ink pixels with that reach;
a positive is kept only if the other marker is reached, a negative only if it is not. In both
classes the two candidate curves (the marked one(s) and the one that is marked in negatives) must
not be linked to each other either, so crossings carry no cue. The markers must lie at least ``min_sep``
pixels apart in both classes.

Differences from the original generator (Linsley et al.'s ``snakes`` code, which LRA rendered at
32x32): curves here are sampled as continuous random walks with bounded smooth turning and drawn as
pixel dashes, not as chains of fixed paddle sprites with a collision check and a curvature limit;
markers are 3x3 squares at intensity 255 and paths intensity 128 (the original draws
anti-aliased circles and paddles); the number of curves is fixed per data set (``n_paths``), the
original varies distractor snakes and paddle counts by difficulty; ambiguous images (a marked
curve touching another) are rejected by flood fill rather than prevented by construction. Accuracy
numbers on these images are therefore comparable in spirit, not in value, to LRA's.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

__all__ = ["pathfinder_dataset", "reach", "connected", "PATH_LEVEL", "MARKER_LEVEL", "SIZE_PRESETS"]

#: candidate images generated per attempt at most (bounds memory for large data sets)
_CHUNK = 16384
#: the curve settings ``pathfinder_dataset`` uses when they are not given: LRA's Pathfinder-32 ones,
#: or ``SIZE_PRESETS[size]`` over them
_CURVE_DEFAULTS = dict(n_paths=4, path_len=18.0, min_sep=6.0)
#: curve settings per image side where they differ from the 32x32 ones: the reduced CPU grid's 16x16
#: images hold 3 curves of 12 pixels (4 curves of 18 pixels ink a quarter of a 16x16 image, and its
#: flood-fill checks reject so many candidates that 2000 images take 22 s instead of 0.8 s on the
#: project's CPU)
SIZE_PRESETS = {16: dict(n_paths=3, path_len=12.0, min_sep=5.0)}
#: pixel intensity of the dashed curves and of the two markers
PATH_LEVEL = 128
MARKER_LEVEL = 255


def reach(gap_len: float, step: float) -> int:
    """reach: the largest Chebyshev distance between consecutive ink pixels of one curve.

    Consecutive inked samples are less than ``gap_len + 2 * step`` apart along the curve (the last
    sample of a dash is within ``step`` of its end, the first of the next dash within ``step`` of
    its start); rounding each to a pixel adds less than 1 per axis, so the pixel distance is an
    integer below ``gap_len + 2 * step + 1``."""
    return int(math.ceil(gap_len + 2 * step))


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    """Square (Chebyshev radius ``r``) binary dilation of bool ``[n, S, S]``: separable shifted ORs."""
    rows = m.clone()
    for s in range(1, r + 1):
        rows[:, s:] |= m[:, :-s]
        rows[:, :-s] |= m[:, s:]
    out = rows.clone()
    for s in range(1, r + 1):
        out[:, :, s:] |= rows[:, :, :-s]
        out[:, :, :-s] |= rows[:, :, s:]
    return out


def connected(images: torch.Tensor, seeds: torch.Tensor, targets: torch.Tensor, reach_px: int,
              max_iter: int = 10_000) -> torch.Tensor:
    """connected: whether any ``targets`` pixel is reached from the ``seeds`` pixels over non-zero
    pixels of ``images`` with steps of Chebyshev distance <= ``reach_px`` (vectorized flood fill:
    repeated square dilation restricted to ink, all images at once).

    Args: images ``[n, S, S]`` (any dtype, > 0 = ink); seeds, targets bool ``[n, S, S]``.
    Returns bool ``[n]``."""
    ink = torch.as_tensor(images) > 0
    cur = torch.as_tensor(seeds).bool() & ink
    for _ in range(max_iter):
        nxt = _dilate(cur, reach_px) & ink
        if torch.equal(nxt, cur):
            break
        cur = nxt
    return (cur & torch.as_tensor(targets).bool()).flatten(1).any(1)


def _curves(rng: np.random.Generator, m: int, n_paths: int, size: int, path_len: float, step: float,
            turn_std: float, margin: float) -> np.ndarray:
    """[m, n_paths, L + 1, 2] float positions (row, col) of random smooth curves inside the image."""
    L = max(2, int(round(path_len / step)))
    lo, hi = margin, size - 1 - margin
    pos = np.empty((m, n_paths, L + 1, 2))
    pos[:, :, 0] = rng.uniform(lo, hi, size=(m, n_paths, 2))
    theta = rng.uniform(0, 2 * np.pi, size=(m, n_paths))
    d = np.stack([np.sin(theta), np.cos(theta)], -1)
    turns = rng.normal(0.0, turn_std, size=(m, n_paths, L))
    for t in range(L):  # a loop over the curve's steps only (vectorized over examples and curves)
        c, s = np.cos(turns[..., t]), np.sin(turns[..., t])
        d = np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], -1)
        p = pos[:, :, t] + step * d
        out_lo, out_hi = p < 0.5, p > size - 1.5  # reflect at the borders
        bounce = out_lo | out_hi
        d = np.where(bounce, -d, d)
        p = np.where(bounce, pos[:, :, t] + step * d, p)
        pos[:, :, t + 1] = np.clip(p, 0, size - 1)
    return pos


def _render(pos: np.ndarray, ink: np.ndarray, size: int) -> np.ndarray:
    m = pos.shape[0]
    img = np.zeros((m, size, size), dtype=np.uint8)
    pix = np.rint(pos).astype(np.int64)
    b = np.broadcast_to(np.arange(m)[:, None, None], ink.shape)
    img[b[ink], pix[..., 0][ink], pix[..., 1][ink]] = PATH_LEVEL
    return img


def _marker_masks(pts: np.ndarray, size: int) -> np.ndarray:
    """bool [m, size, size]: 3x3 squares around integer points ``pts [m, 2]``."""
    m = pts.shape[0]
    r = np.arange(size)
    dr = np.abs(r[None, :, None] - pts[:, 0, None, None])
    dc = np.abs(r[None, None, :] - pts[:, 1, None, None])
    return (dr <= 1) & (dc <= 1) & np.ones((m, 1, 1), dtype=bool)


def pathfinder_dataset(n: int, *, seed: int = 0, size: int = 32, n_paths: Optional[int] = None,
                       path_len: Optional[float] = None, dash_len: float = 2.0, gap_len: float = 1.0,
                       step: float = 0.5, turn_std: float = 0.2, min_sep: Optional[float] = None,
                       margin: float = 2.0, return_meta: bool = False):
    """pathfinder_dataset: ``n`` Pathfinder images and labels (module docstring), seeded.

    Args:
        n: number of examples (labels exactly balanced: ``n // 2`` positives, shuffled).
        seed: the numpy ``Generator`` seed (same seed, same data).
        size: image side (LRA Pathfinder-32: 32). n_paths: curves per image (>= 2: the marked
            ones and distractors). path_len: curve length in pixels. dash_len, gap_len: dash and
            gap lengths along the curve (pixels). step: sampling step along the curve (pixels).
            turn_std: direction change per step (radians, Gaussian). min_sep: minimum distance of
            the two markers. margin: start points keep this far from the border. ``n_paths``,
            ``path_len`` and ``min_sep`` default to 4, 18 and 6 (32x32), or to ``SIZE_PRESETS[size]``.
        return_meta: also return a dict with the marker pixels (``marker_a``, ``marker_b``
            ``[n, 2]``) and ``reach`` (for tests).

    Returns:
        ``(images uint8 [n, size, size], labels int64 [n])`` as torch tensors (and the meta dict).
    """
    curve = {**_CURVE_DEFAULTS, **SIZE_PRESETS.get(size, {})}
    n_paths = curve["n_paths"] if n_paths is None else n_paths
    path_len = curve["path_len"] if path_len is None else path_len
    min_sep = curve["min_sep"] if min_sep is None else min_sep
    for name, v, lo in (("n", n, 1), ("size", size, 8), ("n_paths", n_paths, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    for name, v in (("path_len", path_len), ("dash_len", dash_len), ("step", step), ("min_sep", min_sep)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name}: expected a positive number, got {v!r}")
    for name, v in (("gap_len", gap_len), ("turn_std", turn_std), ("margin", margin)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
    if step > dash_len:
        raise ValueError(f"step: expected at most dash_len={dash_len} (every dash needs a sample), got {step}")
    if 2 * margin >= size - 2:
        raise ValueError(f"margin: expected less than {(size - 2) / 2} for size {size}, got {margin}")
    rng = np.random.default_rng(seed)
    rp = reach(gap_len, step)
    want = np.zeros(n, dtype=np.int64)
    want[rng.permutation(n)[: n // 2]] = 1
    need = {0: int((want == 0).sum()), 1: int((want == 1).sum())}
    got = {0: [], 1: []}
    for _ in range(1000):
        left = max(need[c] - sum(x[0].shape[0] for x in got[c]) for c in (0, 1))
        if left <= 0:
            break
        m = min(_CHUNK, max(64, 4 * left))  # about a quarter of the candidates pass per label
        pos = _curves(rng, m, n_paths, size, path_len, step, turn_std, margin)
        L1 = pos.shape[2]
        s = np.arange(L1) * step
        ink = np.broadcast_to((np.mod(s, dash_len + gap_len) < dash_len) | (np.arange(L1) == L1 - 1),
                              pos.shape[:3]).copy()
        img = _render(pos, ink, size)
        ends = np.rint(pos[:, :2, [0, -1]]).astype(np.int64)  # [m, 2 curves, 2 ends, 2]
        # in both classes the two marked-candidate curves must not touch (no cue in crossings)
        c0 = _render(pos[:, :1], ink[:, :1], size) > 0
        c1 = _render(pos[:, 1:2], ink[:, 1:2], size) > 0
        apart = ~connected(torch.from_numpy(img), torch.from_numpy(c0), torch.from_numpy(c1), rp).numpy()
        for label in (0, 1):
            have = sum(x[0].shape[0] for x in got[label])
            if have >= need[label]:
                continue
            a = ends[:, 0, 0]
            b = ends[:, 0, 1] if label == 1 else ends[:, 1, 1]
            sep = np.sqrt(((a - b) ** 2).sum(-1)) >= min_sep
            ma, mb = _marker_masks(a, size), _marker_masks(b, size)
            im = img.copy()
            im[ma | mb] = MARKER_LEVEL
            link = connected(torch.from_numpy(im), torch.from_numpy(ma), torch.from_numpy(mb), rp).numpy()
            ok = sep & apart & (link == bool(label)) & (np.arange(m) % 2 == label)  # disjoint candidates
            if label == 0:  # the markers must not touch each other's curve either (no ambiguity)
                ok &= ~(ma & mb).reshape(m, -1).any(1)
            got[label].append((im[ok], a[ok], b[ok]))
    else:  # pragma: no cover - only with extreme settings (e.g. huge reach on a tiny image)
        raise ValueError(f"pathfinder_dataset: could not generate {n} valid images with these settings "
                         f"(reach={rp} px, n_paths={n_paths}, size={size}); use fewer or shorter paths")
    images = np.zeros((n, size, size), dtype=np.uint8)
    ma_all = np.zeros((n, 2), dtype=np.int64)
    mb_all = np.zeros((n, 2), dtype=np.int64)
    for label in (0, 1):
        im = np.concatenate([x[0] for x in got[label]])[: need[label]]
        aa = np.concatenate([x[1] for x in got[label]])[: need[label]]
        bb = np.concatenate([x[2] for x in got[label]])[: need[label]]
        where = np.nonzero(want == label)[0]
        images[where], ma_all[where], mb_all[where] = im, aa, bb
    out = (torch.from_numpy(images), torch.from_numpy(want))
    if return_meta:
        return out + ({"marker_a": torch.from_numpy(ma_all), "marker_b": torch.from_numpy(mb_all), "reach": rp},)
    return out
