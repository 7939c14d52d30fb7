"""Public predicate builder: composable masks give the same patterns as the constructors, and the one
sink + recent-window rule agrees with every place that applies it."""
import pytest
import torch

import sparsattn.patterns as P


def _dense_ref(fn, q_len, kv_len, causal):
    off = kv_len - q_len
    q = torch.arange(q_len)[:, None] + off
    k = torch.arange(kv_len)[None, :]
    m = fn(q, k).expand(q_len, kv_len)
    return m & (k <= q) if causal else m


@pytest.mark.parametrize("q_len,kv_len", [(77, 77), (45, 109)])
def test_sink_window_mask_matches_sink_local_and_elementwise(q_len, kv_len):
    a = P.from_predicate(P.or_(P.sink_mask(5), P.sliding_window_mask(23)), q_len, kv_len, causal=True, block_q=16)
    b = P.sink_local(q_len, 5, 23, kv_len, block_q=16)
    c = P.from_predicate(P.sink_window_mask(5, 23), q_len, kv_len, causal=True, block_q=16)
    ref = _dense_ref(lambda q, k: P.sink_or_recent(k, q + 1, 5, 23), q_len, kv_len, True)
    for p in (a, b, c):
        assert torch.equal(p.validate().to_dense_mask()[0, 0], ref)
    # exact bounds from the element predicate alone (no block bounds given) give the same blocks
    d = P.from_predicate(lambda q, k: (k < 5) | (q - k < 23), q_len, kv_len, causal=True, block_q=16)
    assert torch.equal(d.full_sel(), b.full_sel()) and torch.equal(d.partial_sel(), b.partial_sel())


def test_combinators_and_per_head_predicate():
    T = 70
    m = P.and_(P.not_(P.sink_mask(3)), P.sliding_window_mask(9, causal=False))
    p = P.from_predicate(m, T, block_q=16, heads=2)
    ref = _dense_ref(lambda q, k: (k >= 3) & ((q - k).abs() < 9), T, T, False)
    assert p.heads == 2 and torch.equal(p.to_dense_mask()[0, 1], ref)
    spans = torch.tensor([4, 30])
    ph = P.from_predicate(P.mask_mod(lambda q, k, h: (q - k) < spans[h]), T, causal=True, block_q=16, heads=2)
    dm = ph.validate().to_dense_mask()[0]
    for h in range(2):
        assert torch.equal(dm[h], _dense_ref(lambda q, k: (q - k) < int(spans[h]), T, T, True))
    with pytest.raises(ValueError, match="mask"):
        P.from_predicate(3, T)


def test_one_sink_window_rule_for_decode_and_kv_policies():
    from sparsattn.methods._select import sink_window_mask

    lens = torch.tensor([0, 5, 40])
    got = sink_window_mask(3, 2, 48, lens, 4, 7)
    t = torch.arange(48)[None, :]
    ref = P.sink_or_recent(t, lens[:, None], 4, 7) & (t < lens[:, None])
    assert torch.equal(got, ref[:, None, :].expand(3, 2, 48))


def test_merge_heads_one_rule():
    T = 90
    a = P.sink_local(T, 3, 20, block_q=16, heads=2)
    b = P.sliding_window(T, 11, block_q=16).union(
        P.from_dense_mask(torch.rand(1, 1, T, T, generator=torch.Generator().manual_seed(1)) < 0.1, block_size=16, causal=True))
    m = P.merge_heads([([4, 0], a), ([2], b, [0])], 5).validate()
    dm, da, db = m.to_dense_mask()[0], a.to_dense_mask()[0], b.to_dense_mask()[0]
    assert torch.equal(dm[4], da[0]) and torch.equal(dm[0], da[1]) and torch.equal(dm[2], db[0])
    assert not dm[1].any() and not dm[3].any()  # heads no part names are empty
    with pytest.raises(ValueError, match="each head in one part only"):
        P.merge_heads([([0], b), ([0], b)], 2)
    with pytest.raises(ValueError, match="block_q"):
        P.merge_heads([([0], b), ([1], P.causal(T, block_q=32))], 2)
