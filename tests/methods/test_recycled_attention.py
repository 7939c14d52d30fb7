import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext

from _sparse_decode_utils import assert_equals_dense, needle_case, selects


def _ranking(q, k, kl, scale, pool):
    """Reference ranking of a full step, written with loops: per (b, kv head) token ids by descending
    max-pooled (over ``pool`` neighbours) group-max softmax probability."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = []
    for b in range(B):
        L = int(kl[b])
        row = []
        for h in range(Hkv):
            probs = torch.stack([torch.softmax(k[b, h, :L].double() @ q[b, h * G + g].double() * scale, 0)
                                 for g in range(G)]).amax(0)
            r = pool // 2
            pooled = torch.stack([probs[max(0, t - r):t + r + 1].max() for t in range(L)])
            row.append(pooled.argsort(descending=True, stable=True).tolist())
        out.append(row)
    return out


def test_partial_steps_evict_the_lowest_recycled_score():
    """RefreshKV Algorithm 1: a partial step reads C_p (K entries) + the current token, then appends it
    and evicts the lowest-scored recycled entry; after K such steps the oldest new token goes first."""
    T, K = 400, 6
    q, k, v, pos = needle_case(T=T)
    m = get_method("recycled_attention", budget=K, stride=100, pool_kernel=1)
    ctx = SelectContext(layer=3)
    kl0 = torch.tensor([380, 300])
    ctx.extras["kv_lens"] = kl0
    p = m.select(q, k, ctx)
    assert ctx.extras["full_step"] and p.counts.tolist() == [[380, 380], [300, 300]]
    rank = _ranking(q, k, kl0, 1 / 8, 1)
    for j in range(1, 10):  # partial step j: j tokens appended since the full step (the current one included)
        kl = kl0 + j
        ctx.extras["kv_lens"] = kl
        p = m.select(q, k, ctx)
        assert not ctx.extras["full_step"]
        assert (p.counts == K + 1).all()  # C_p (K entries) + the current token
        got = p.to_token_mask()
        for b in range(2):
            keep_rec = max(K - (j - 1), 0)
            new_lo = int(kl0[b]) + max(j - 1 - K, 0)
            for h in range(2):
                want = set(rank[b][h][:keep_rec]) | set(range(new_lo, int(kl[b])))
                assert set(got[b, h].nonzero().flatten().tolist()) == want, (j, b, h)
                if keep_rec:
                    assert got[b, h, pos[b]]  # the needle is the best-ranked token: evicted last


def test_stride_schedule_and_budget_ratio():
    q, k, v, pos = needle_case()
    m = get_method("recycled_attention", budget=64, stride=4)
    ctx = SelectContext(layer=7)
    fulls = []
    for step in range(9):
        ctx.extras["kv_lens"] = torch.tensor([1900 + step, 1900 + step])
        p = m.select(q, k, ctx)
        fulls.append(ctx.extras["full_step"])
        if not ctx.extras["full_step"]:
            assert all(selects(p, b, h, pos[b]) for b in range(2) for h in range(2))
            assert (p.counts == 65).all()
        else:
            assert int(p.counts.min()) == 1900 + step
    assert fulls == [True, False, False, False, True, False, False, False, True]
    # K = budget_ratio x context (1/8 by default), fixed at the full step; the context is the longest
    # sequence's valid tokens (1600), not the row width (2048: a static cache's buffer is wider)
    m = get_method("recycled_attention", stride=10)
    ctx = SelectContext(layer=0, extras={"kv_lens": torch.tensor([1600, 1200])})
    m.select(q, k, ctx)
    ctx.extras["kv_lens"] = torch.tensor([1601, 1201])
    assert (m.select(q, k, ctx).counts == 1600 // 8 + 1).all()


def test_similarity_schedule():
    q, k, v, _ = needle_case(T=500)
    m = get_method("recycled_attention", budget=32, schedule="similarity", check_every=2, similarity=0.9)
    ctx = SelectContext(layer=0)
    flags = []
    for step, qq in enumerate([q, q, q, q, -q, -q]):
        m.select(qq, k, ctx)
        flags.append(ctx.extras["full_step"])
    # check at every 2nd partial step: same query -> no refresh; opposite query -> refresh
    assert flags == [True, False, False, False, True, False]


def test_full_budget_equals_dense():
    q, k, v, _ = needle_case(T=300)
    m = get_method("recycled_attention", budget=300, stride=3)
    ctx = SelectContext(layer=0)
    for step in range(4):
        kl = torch.tensor([290 + step, 200 + step])
        ctx.extras["kv_lens"] = kl
        assert_equals_dense(q, k, v, m.select(q, k, ctx), kl)
    with pytest.raises(ValueError, match="pool_kernel"):
        get_method("recycled_attention", pool_kernel=4)
