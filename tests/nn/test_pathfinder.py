"""Pathfinder generator: balanced labels, seeded, and the labels agree with an independent
breadth-first flood fill over the dash gaps at the generator's known reach."""
from collections import deque

import numpy as np
import pytest
import torch

from sparsattn.eval.pathfinder import MARKER_LEVEL, PATH_LEVEL, pathfinder_dataset, reach


def _bfs_linked(img: np.ndarray, a, b, r: int) -> bool:
    """Plain BFS over ink pixels (> 0) from the 3x3 marker around ``a``; neighbours are ink pixels
    within Chebyshev distance ``r``; True when a pixel of the marker around ``b`` is reached."""
    S = img.shape[0]
    start = [(i, j) for i in range(a[0] - 1, a[0] + 2) for j in range(a[1] - 1, a[1] + 2)
             if 0 <= i < S and 0 <= j < S and img[i, j] > 0]
    goal = {(i, j) for i in range(b[0] - 1, b[0] + 2) for j in range(b[1] - 1, b[1] + 2)}
    seen = set(start)
    todo = deque(start)
    while todo:
        i, j = todo.popleft()
        if (i, j) in goal:
            return True
        for di in range(-r, r + 1):
            for dj in range(-r, r + 1):
                p = (i + di, j + dj)
                if 0 <= p[0] < S and 0 <= p[1] < S and p not in seen and img[p] > 0:
                    seen.add(p)
                    todo.append(p)
    return False


def test_labels_balanced_seeded_and_connectivity_matches_bfs():
    x, y, meta = pathfinder_dataset(120, seed=3, return_meta=True)
    assert x.shape == (120, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert int(y.sum()) == 60
    assert set(np.unique(x.numpy())) <= {0, PATH_LEVEL, MARKER_LEVEL}
    r = meta["reach"]
    assert r == reach(1.0, 0.5) == 2
    xs, ys = x.numpy(), y.numpy()
    a, b = meta["marker_a"].numpy(), meta["marker_b"].numpy()
    for i in range(120):
        assert (xs[i] == MARKER_LEVEL).sum() >= 8  # two 3x3 markers (the border may clip them)
        assert _bfs_linked(xs[i], a[i], b[i], r) == bool(ys[i]), i
    # a gap of the dashes is real: at a smaller reach some positive curves fall apart
    assert any(not _bfs_linked(xs[i], a[i], b[i], 1) for i in range(120) if ys[i])
    x2, y2 = pathfinder_dataset(120, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = pathfinder_dataset(120, seed=4)
    assert not torch.equal(x, x3)


def test_other_size_and_odd_count():
    x, y = pathfinder_dataset(15, seed=0, size=24, n_paths=3, path_len=14.0)
    assert x.shape == (15, 24, 24) and int(y.sum()) == 7


@pytest.mark.parametrize("kwargs,arg", [
    (dict(n=0), "n"), (dict(size=4), "size"), (dict(n_paths=1), "n_paths"), (dict(path_len=0), "path_len"),
    (dict(gap_len=-1), "gap_len"), (dict(step=3.0), "step"), (dict(margin=20.0), "margin"),
])
def test_invalid_arguments(kwargs, arg):
    kw = dict(n=4)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        pathfinder_dataset(kw.pop("n"), **kw)


def test_size_preset_keeps_the_labels_true_on_16x16_images():
    """The reduced grid's 16x16 images (SIZE_PRESETS[16]) are balanced and their labels agree
    with the BFS, like the 32x32 ones."""
    from sparsattn.eval.pathfinder import SIZE_PRESETS

    x, y, meta = pathfinder_dataset(60, seed=1, size=16, return_meta=True, **SIZE_PRESETS[16])
    assert x.shape == (60, 16, 16) and int(y.sum()) == 30
    a, b = meta["marker_a"].numpy(), meta["marker_b"].numpy()
    for i in range(60):
        assert _bfs_linked(x[i].numpy(), a[i], b[i], meta["reach"]) == bool(y[i]), i
