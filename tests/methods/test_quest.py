import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext

from _sparse_decode_utils import assert_equals_dense, needle_case, selects


def test_full_budget_equals_dense_and_dense_layers():
    q, k, v, _ = needle_case(T=333)
    kl = torch.tensor([333, 200])
    m = get_method("quest", token_budget=4096)
    p = m.select(q, k, SelectContext(layer=5, extras={"kv_lens": kl}))
    assert p.page_size == 16
    assert_equals_dense(q, k, v, p, kl, backend=None)  # triton (interpreted on the CPU) when available
    # the first two layers are dense whatever the budget
    p0 = get_method("quest", token_budget=16).select(q, k, SelectContext(layer=1, extras={"kv_lens": kl}))
    assert_equals_dense(q, k, v, p0, kl)


def test_needle_found_at_small_budget_and_bound_is_upper():
    q, k, v, pos = needle_case()
    m = get_method("quest", token_budget=64)  # 4 of 128 pages (3%)
    ctx = SelectContext(layer=3)
    p = m.select(q, k, ctx)
    assert p.counts.max() == 4
    assert all(selects(p, b, h, pos[b]) for b in range(2) for h in range(2))
    # the page score bounds every q.k of the page
    kmin, kmax = ctx.state["quest"][3]["kmin"], ctx.state["quest"][3]["kmax"]
    qg = q.view(2, 2, 4, 1, 64)
    ub = torch.maximum(qg * kmin[:, :, None], qg * kmax[:, :, None]).sum(-1)  # [B, H, G, pages]
    s = torch.einsum("bhgd,bhtd->bhgt", q.view(2, 2, 4, 64), k).view(2, 2, 4, 128, 16).amax(-1)
    assert (ub >= s - 1e-4).all()


def test_incremental_page_metadata_matches_recompute():
    gen = torch.Generator().manual_seed(1)
    B, H, D, T = 2, 2, 32, 100
    k = torch.randn(B, H, T, D, generator=gen)
    m = get_method("quest", token_budget=48, page_size=16)
    ctx = SelectContext(layer=2)
    for L in (37, 38, 50, 64, 65, 100):
        q = torch.randn(B, 2 * H, D, generator=gen)
        kl = torch.tensor([L, max(L - 20, 1)])
        ctx.extras["kv_lens"] = kl
        p = m.select(q, k, ctx)
        fresh = m.select(q, k, SelectContext(layer=2, extras={"kv_lens": kl}))
        assert torch.equal(p.to_unit_mask(), fresh.to_unit_mask())
        assert (p.indices[p.counts > 0].max() if (p.counts > 0).any() else 0) * 16 < L


def test_head_reduce_none_gives_query_heads():
    q, k, v, pos = needle_case(T=256)
    p = get_method("quest", token_budget=48, head_reduce="none").select(q, k, SelectContext(layer=4))
    assert p.heads == 8
    with pytest.raises(ValueError, match="page_size"):
        get_method("quest", page_size=0)
