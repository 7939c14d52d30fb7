"""Tests of sparsattn.eval.mqar (Zoology MQAR generator)."""
from __future__ import annotations

import pytest
import torch

from sparsattn.eval.mqar import IGNORE_INDEX, mqar, mqar_accuracy


@pytest.mark.parametrize("L,K,V", [(64, 4, 8192), (128, 8, 8192), (256, 16, 512), (64, 16, 64)])
def test_structure(L, K, V):
    n = 300
    x, y = mqar(n, L, K, V, seed=0)
    assert x.shape == y.shape == (n, L) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < V
    keys, vals = x[:, 0:2 * K:2], x[:, 1:2 * K:2]
    assert bool(((keys >= 1) & (keys < V // 2)).all())
    assert bool(((vals >= V // 2) & (vals < V)).all())
    # keys (and values) distinct within a sequence
    assert bool((keys.sort(-1).values.diff(dim=-1) > 0).all())
    assert bool((vals.sort(-1).values.diff(dim=-1) > 0).all())
    scored = y != IGNORE_INDEX
    assert bool((scored.sum(-1) == K).all())  # every key is queried exactly once
    assert not bool(scored[:, :2 * K].any())  # the context is never scored
    for i in range(n):
        kv = dict(zip(keys[i].tolist(), vals[i].tolist()))
        pos = scored[i].nonzero().flatten().tolist()
        assert sorted(x[i, pos].tolist()) == sorted(kv)  # each key once as a query
        for t in pos:
            assert (t - 2 * K) % 2 == 0
            assert y[i, t].item() == kv[x[i, t].item()]  # target = the value paired with the key


def test_gap_power_law():
    """Gaps follow p(g) ~ (g+1)^(a-1): far more queries near the context than far away."""
    K, L = 8, 512
    _, y = mqar(4000, L, K, seed=1)
    gaps = ((y != IGNORE_INDEX).nonzero()[:, 1] - 2 * K) // 2
    counts = torch.bincount(gaps, minlength=(L - 2 * K) // 2).double()
    assert counts[0] > 3 * counts[20]
    assert counts[:10].sum() > counts[100:].sum() / 3
    _, yu = mqar(4000, L, K, power_a=1.0, seed=1)  # a = 1: uniform
    gu = ((yu != IGNORE_INDEX).nonzero()[:, 1] - 2 * K) // 2
    cu = torch.bincount(gu, minlength=(L - 2 * K) // 2).double()
    assert float(cu[:62].sum()) == pytest.approx(float(cu[186:].sum()), rel=0.1)


def test_seeded():
    a = mqar(50, 64, 4, seed=3)
    b = mqar(50, 64, 4, seed=3)
    c = mqar(50, 64, 4, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_no_random_fill():
    x, y = mqar(10, 64, 4, seed=0, random_non_queries=False)
    used = (y != IGNORE_INDEX)
    used[:, :8] = True
    assert bool((x[~used] == 0).all())


def test_accuracy():
    x, y = mqar(20, 64, 4, seed=0)
    perfect = torch.where(y != IGNORE_INDEX, y, torch.zeros_like(y))
    assert mqar_accuracy(perfect, y) == 1.0
    logits = torch.zeros(20, 64, 8192)
    logits.scatter_(-1, perfect.unsqueeze(-1), 1.0)
    assert mqar_accuracy(logits, y) == 1.0
    half = perfect.clone()
    sc = (y != IGNORE_INDEX).nonzero()
    half[sc[::2, 0], sc[::2, 1]] = 0
    assert mqar_accuracy(half, y) == pytest.approx(0.5, abs=0.02)


def test_errors():
    with pytest.raises(ValueError, match="seq_len"):
        mqar(4, 30, 8, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        mqar(4, 64, 16, vocab_size=16, seed=0)
    with pytest.raises(ValueError, match="power_a"):
        mqar(4, 64, 4, power_a=0.0, seed=0)
    with pytest.raises(ValueError, match="n_examples"):
        mqar(0, 64, 4, seed=0)
