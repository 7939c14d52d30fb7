import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext

from _sparse_decode_utils import assert_equals_dense, needle_case, selects

pytest.importorskip("hnswlib")  # the optional 'ann' extra (index='hnsw')


def test_needle_retrieved_and_static_tokens_kept():
    q, k, v, pos = needle_case()
    m = get_method("retrieval_attention", n_sink=16, window=32, top_k=8)
    ctx = SelectContext(layer=0)
    p = m.select(q, k, ctx)
    tm = p.to_token_mask()
    assert tm[:, :, :16].all() and tm[:, :, -32:].all()
    assert all(selects(p, b, h, pos[b]) for b in range(2) for h in range(2))
    assert int(p.counts.max()) <= 16 + 32 + 4 * 8  # group union of per-head top-k
    assert ctx.state["retrieval_attention"][0]["upto"] == [2048 - 32, 2048 - 32]


def test_index_grows_as_tokens_leave_the_window():
    q, k, v, _ = needle_case(T=600, pos=(10, 20))
    m = get_method("retrieval_attention", n_sink=4, window=50, top_k=5)
    ctx = SelectContext(layer=1)
    gen = torch.Generator().manual_seed(2)
    for L in (300, 301, 420):
        ctx.extras["kv_lens"] = torch.tensor([L, L])
        k2 = k.clone()
        k2[:, :, L - 51] = 8 * q.view(2, 2, 4, 64).mean(2)  # just left the window: must be indexed
        p = m.select(q, k2, ctx)
        assert all(selects(p, b, h, L - 51) for b in range(2) for h in range(2)), L
        assert ctx.state["retrieval_attention"][1]["upto"] == [L - 50, L - 50]


def test_full_budget_equals_dense():
    q, k, v, _ = needle_case(T=400)
    kl = torch.tensor([400, 333])
    p = get_method("retrieval_attention", n_sink=8, window=16, top_k=1000).select(
        q, k, SelectContext(extras={"kv_lens": kl}))
    assert_equals_dense(q, k, v, p, kl)
    with pytest.raises(ValueError, match="top_k"):
        get_method("retrieval_attention", top_k=-1)


def test_attention_aware_index_finds_the_needle():
    q, k, v, pos = needle_case(T=1024, pos=(300, 600))
    gen = torch.Generator().manual_seed(7)
    # prefill queries resemble the decode query (same direction), keys do not
    prefill_q = q[:, :, None, :] + 0.5 * torch.randn(2, 8, 64, 64, generator=gen)
    m = get_method("retrieval_attention", n_sink=8, window=32, top_k=8, index="attention_aware")
    ctx = SelectContext(layer=0, extras={"prefill_q": prefill_q, "kv_lens": torch.tensor([900, 900])})
    p = m.select(q, k, ctx)
    assert all(selects(p, b, h, pos[b]) for b in range(2) for h in range(2))
    # later steps insert the tokens leaving the window into the graph
    k2 = k.clone()
    k2[:, :, 960] = 8 * q.view(2, 2, 4, 64).mean(2)
    ctx.extras["kv_lens"] = torch.tensor([1000, 1000])  # 960 < 1000 - 32: now indexed, not in the window
    p2 = m.select(q, k2, ctx)
    assert all(selects(p2, b, h, 960) for b in range(2) for h in range(2))
    with pytest.raises(ValueError, match="prefill_q"):
        m.select(q, k, SelectContext(layer=0))
