"""Attention-aware key graph: recall on out-of-distribution queries, incremental insertion."""
import numpy as np
import pytest

hnswlib = pytest.importorskip("hnswlib")  # the optional 'ann' extra

from sparsattn.methods._ann import AttentionAwareIndex


def _ood(N=2000, D=32, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((N, D)).astype(np.float32) + 2.0
    mu = rng.standard_normal(D).astype(np.float32)
    qs = (rng.standard_normal((400, D)) + 3 * mu).astype(np.float32)
    return keys, qs[:300], qs[300:], rng


def _recall(keys, queries, search, k=10):
    r = 0.0
    for q in queries:
        true = set(np.argsort(-(keys @ q))[:k].tolist())
        r += len(true & set(np.asarray(search(q, k)).tolist())) / k
    return r / len(queries)


def test_attention_aware_beats_key_only_hnsw_on_ood_queries():
    keys, train, test, _ = _ood()
    N, D = keys.shape
    aa = AttentionAwareIndex(D).build(keys, np.arange(N), train)
    h = hnswlib.Index(space="ip", dim=D)
    h.init_index(max_elements=N, ef_construction=200, M=16, random_seed=0)
    h.add_items(keys, np.arange(N), num_threads=1)
    h.set_ef(32)
    r_aa = _recall(keys, test, lambda q, k: aa.search(q, k, ef=32))
    r_h = _recall(keys, test, lambda q, k: h.knn_query(q, k=k, num_threads=1)[0][0])
    assert r_aa >= 0.9 and r_aa > r_h + 0.3, (r_aa, r_h)


def test_added_keys_are_found_and_labels_kept():
    keys, train, test, rng = _ood(N=800)
    N, D = keys.shape
    aa = AttentionAwareIndex(D).build(keys, np.arange(100, 100 + N), train)
    q = test[0]
    new = np.stack([5 * q, rng.standard_normal(D).astype(np.float32)])
    aa.add(new, np.array([5000, 5001]))
    assert len(aa) == N + 2
    got = aa.search(q, 5, ef=32)
    assert got[0] == 5000 and set(got.tolist()) <= set(range(100, 100 + N)) | {5000, 5001}
    # without queries the index is a navigable small-world graph over the keys
    nsw = AttentionAwareIndex(D).build(keys[:300], np.arange(300))
    assert _recall(keys[:300], keys[:20] + 0.01, lambda q, k: nsw.search(q, k, ef=64), k=5) >= 0.8
    with pytest.raises(ValueError, match="degree"):
        AttentionAwareIndex(D, degree=0)
