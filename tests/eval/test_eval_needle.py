"""Needle coverage (sparsattn.eval.needle) on a constructed attention example."""
import math

import pytest
import torch

from sparsattn import patterns
from sparsattn.eval.needle import needle_coverage, needle_mass

T, D, BS = 64, 8, 16
NEEDLE = [20, 21, 22]
ROWS = [60, 61, 62, 63]


def _qk():
    """Head 0 (of 2 query heads sharing one kv head) reads the needle from the last rows; head 1 does not."""
    g = torch.Generator().manual_seed(0)
    k = 0.01 * torch.randn(1, 1, T, D, generator=g)
    k[0, 0, NEEDLE, 0] = 1.0
    q = torch.zeros(1, 2, T, D)
    q[0, 0, ROWS, 0] = 40.0  # exp(40 * 1 / sqrt(8)) dwarfs the other 60 keys
    q[0, 1, ROWS, 1] = 0.5   # near-uniform attention: needle mass ~3/64
    return q, k


def test_needle_mass_finds_the_reading_head():
    q, k = _qk()
    m = needle_mass(q, k, ROWS, NEEDLE)
    assert m.shape == (2,)
    assert m[0] > 0.99
    assert m[1] < 0.1


def test_coverage_kept_by_causal_lost_by_local_window():
    q, k = _qk()
    layers = {0: (q, k), 1: (q, k)}
    dense = needle_coverage(layers, {0: patterns.causal(T, block_q=BS), 1: patterns.causal(T, block_q=BS)},
                            ROWS, NEEDLE)
    assert dense["n_reading"] == 2 and dense["coverage"] == 1.0  # head 0 of both layers
    local = needle_coverage(layers, {0: patterns.sink_local(T, 4, 16, block_q=BS),
                                     1: patterns.causal(T, block_q=BS)}, ROWS, NEEDLE)
    assert local["n_reading"] == 2 and local["n_kept"] == 1 and local["coverage"] == 0.5
    lost = [h for h in local["heads"] if not h["kept"]]
    assert [(h["layer"], h["head"]) for h in lost] == [(0, 0)] and lost[0]["kept_fraction"] < 0.01


def test_coverage_per_head_block_mask():
    q, k = _qk()
    nq = T // BS
    bm = torch.zeros(1, 2, nq, nq, dtype=torch.bool)
    bm[:, :, torch.arange(nq), torch.arange(nq)] = True  # diagonal only
    bm[0, 1, 3, 1] = True  # the needle block (keys 16..31) for the head that does not read it
    p = patterns.from_block_mask(bm, block_size=BS, q_len=T, causal=True)
    out = needle_coverage({0: (q, k)}, {0: p}, ROWS, NEEDLE)
    assert out["coverage"] == 0.0
    bm[0, 0, 3, 1] = True
    out = needle_coverage({0: (q, k)}, {0: patterns.from_block_mask(bm, block_size=BS, q_len=T, causal=True)},
                          ROWS, NEEDLE)
    assert out["coverage"] == 1.0 and out["heads"][0]["kept_fraction"] > 0.99


def test_no_reading_head_is_nan_and_bad_input_raises():
    q, k = _qk()
    out = needle_coverage({0: (q, k)}, {}, [5], NEEDLE)  # row 5 cannot see the needle (causal)
    assert out["n_reading"] == 0 and math.isnan(out["coverage"])
    with pytest.raises(ValueError, match="needle"):
        needle_mass(q, k, ROWS, [T])
    with pytest.raises(ValueError, match="threshold"):
        needle_coverage({0: (q, k)}, {}, ROWS, NEEDLE, threshold=0)
