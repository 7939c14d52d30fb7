"""LongHeads: chunk keys as in the paper, planted chunk found, budget and forced chunks."""
import math

import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext


def test_chunk_keys_match_bruteforce():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 8, generator=g) for _ in range(3))
    k, v = k[:, :1], v[:, :1]
    m = get_method("longheads", window_size=32, atten_length=96, block_size=32)
    ck = m.chunk_keys(q, k, v, None)
    assert ck.shape == (1, 2, 4, 8)
    h, c = 1, 3  # the ragged last chunk: tokens 96..99
    qc, kc, vc = q[0, h, 96:], k[0, 0, 96:], v[0, 0, 96:]
    o = torch.softmax(qc @ kc.T / math.sqrt(8), -1) @ vc
    cv = o.mean(0)
    ref = torch.softmax(cv @ kc.T / math.sqrt(8), -1) @ kc
    torch.testing.assert_close(ck[0, h, c], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["attention", "mean"])
def test_finds_planted_chunk_and_keeps_first_and_local(mode):
    T, D, w = 1024, 16, 64
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, T, D, generator=g) * 0.3
    k = torch.randn(1, 2, T, D, generator=g) * 0.3
    v = torch.randn(1, 2, T, D, generator=g)
    u = torch.zeros(D)
    u[0] = 1.0
    k[0, 0, 5 * w:6 * w] += u * 3  # head 0: chunk 5 holds the keys the late queries look for
    q[0, 0, 900:] += u * 3
    m = get_method("longheads", window_size=w, atten_length=4 * w, block_size=32, chunk_key=mode)
    p = m.select(q, k, SelectContext(extras={"v": v}))
    sel = p.block_mask()[0]  # [H, nq, nc]
    assert p.block_k == w and p.heads == 2
    assert sel.sum(-1).max() <= 4  # at most atten_length tokens per query block
    qb = 928 // 32
    assert sel[0, qb, 5], "planted chunk not selected"
    assert sel[:, :, 0].all()  # first chunk always
    for i in range(sel.shape[1]):
        cur = (i * 32) // w
        assert sel[:, i, cur].all() and (cur == 0 or sel[:, i, cur - 1].all())


def test_errors_and_clamp():
    q = torch.randn(1, 2, 200, 16)
    m = get_method("longheads", window_size=32, atten_length=96, block_size=32)
    with pytest.raises(ValueError, match="extras"):
        m.select(q, q)
    with pytest.raises(ValueError, match="atten_length"):
        get_method("longheads", atten_length=300)
    with pytest.raises(ValueError, match="window_size"):
        get_method("longheads", window_size=100)
    with pytest.warns(UserWarning, match="atten_length"):
        p = get_method("longheads", chunk_key="mean").select(q, q)
    assert abs(p.density - 1.0) < 1e-12
