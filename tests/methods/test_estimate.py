"""sparsattn.kernels.estimate against brute-force dense computations."""
import math

import pytest
import torch

from sparsattn.kernels import estimate as E


def _probs(q, k, causal=True):
    G = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    Tq, Tk = q.shape[2], k.shape[2]
    if causal:
        i = torch.arange(Tq)[:, None] + (Tk - Tq)
        s = s.masked_fill(torch.arange(Tk)[None, :] > i, float("-inf"))
    return torch.softmax(s, -1)


def _qk(B=2, Hq=4, Hkv=2, Tq=150, Tk=150, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, Tq, D, generator=g), torch.randn(B, Hkv, Tk, D, generator=g)


def test_pool_blocks_mean_max_ragged():
    x = torch.randn(1, 2, 70, 8)
    m = E.pool_blocks(x, 32, "mean")
    assert m.shape == (1, 2, 3, 8)
    torch.testing.assert_close(m[:, :, 2], x[:, :, 64:].mean(2))
    torch.testing.assert_close(m[:, :, 0], x[:, :, :32].mean(2))
    mx = E.pool_blocks(x, 32, "max")
    torch.testing.assert_close(mx[:, :, 2], x[:, :, 64:].amax(2))
    with pytest.raises(ValueError, match="mode"):
        E.pool_blocks(x, 32, "median")


@pytest.mark.parametrize("Tq,Tk", [(150, 150), (40, 150)])
def test_vertical_slash_scores_match_bruteforce(Tq, Tk):
    q, k = _qk(Tq=Tq, Tk=Tk)
    lq = 24
    v, s = E.vertical_slash_scores(q, k, lq)
    p = _probs(q, k)[:, :, -lq:]
    torch.testing.assert_close(v.double(), p.sum(2), atol=1e-5, rtol=1e-5)
    ref = torch.zeros_like(v, dtype=torch.float64)
    for r in range(lq):
        i = Tq - lq + r + (Tk - Tq)
        for d in range(Tk):
            if i - d >= 0:
                ref[..., d] += p[:, :, r, i - d]
    torch.testing.assert_close(s.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_exact_block_scores_match_bruteforce_chunked(reduce):
    q, k = _qk(Tq=100, Tk=100)
    bs = 16
    got = E.exact_block_scores(q, k, bs, reduce=reduce, max_chunk_elems=1)  # one query block per chunk
    p = _probs(q, k)
    nq = nk = -(-100 // bs)
    pp = torch.nn.functional.pad(p, (0, nk * bs - 100, 0, nq * bs - 100)).view(2, 4, nq, bs, nk, bs)
    if reduce == "max":
        ref = pp.amax((3, 5))
    else:
        rows = torch.tensor([min(bs, 100 - i * bs) for i in range(nq)], dtype=torch.float64)
        ref = pp.sum((3, 5)) / rows[:, None]
    allowed = E.causal_block_mask(100, 100, bs, bs)
    torch.testing.assert_close(got.double()[..., allowed], ref[..., allowed], atol=1e-5, rtol=1e-5)
    assert torch.isinf(got[..., ~allowed]).all()


def test_block_scores_causal_and_gqa():
    q, k = _qk()
    s = E.block_scores(q, k, 32)
    qp = E.pool_blocks(q, 32)
    kp = E.pool_blocks(k, 32).repeat_interleave(2, 1)
    ref = qp @ kp.transpose(-1, -2) / 4.0
    m = E.causal_block_mask(150, 150, 32, 32)
    torch.testing.assert_close(s[..., m], ref[..., m])
    assert torch.isinf(s[..., ~m]).all() and (s[..., ~m] < 0).all()


def test_topk_mask_skips_neg_inf():
    s = torch.tensor([[1.0, float("-inf"), 3.0, 2.0], [float("-inf")] * 3 + [0.0]])
    m = E.topk_mask(s, 3)
    assert m.tolist() == [[True, False, True, True], [False, False, False, True]]
    assert E.topk_mask(s, 10).sum() == 4
