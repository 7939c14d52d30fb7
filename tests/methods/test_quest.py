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


def test_lengths_tensor_reused_in_place_and_shrinking_lengths():
    """The incremental state skips its host sync when handed the very lengths tensor it saw last;
    an in-place update of that tensor, or shorter lengths (a new sequence), must still be seen."""
    gen = torch.Generator().manual_seed(2)
    B, H, D, T = 2, 2, 32, 96
    k = torch.randn(B, H, T, D, generator=gen)
    q = torch.randn(B, 2 * H, D, generator=gen)
    m = get_method("quest", token_budget=32, page_size=16)
    ctx = SelectContext(layer=2)
    kl = torch.tensor([30, 9])
    ctx.extras["kv_lens"] = kl
    for step in range(4):
        if step == 1:
            kl += 33  # same tensor object, new version: pages 1..3 must be recomputed
        if step == 3:
            ctx.extras["kv_lens"] = kl = torch.tensor([20, 5])  # shorter: the state is rebuilt
        p = m.select(q, k, ctx)
        fresh = m.select(q, k, SelectContext(layer=2, extras={"kv_lens": kl.clone()}))
        assert torch.equal(p.to_unit_mask(), fresh.to_unit_mask()), step
        st = ctx.state["quest"][2]
        for b in range(B):
            full = int(kl[b]) // 16  # complete pages: bounds of exactly their 16 keys
            if full:
                assert torch.equal(st["kmax"][b, :, :full], k[b, :, :full * 16].view(H, full, 16, D).amax(2))
                assert torch.equal(st["kmin"][b, :, :full], k[b, :, :full * 16].view(H, full, 16, D).amin(2))


def test_triton_page_scores_give_the_reference_selection():
    q, k, v, pos = needle_case(T=300)
    if torch.cuda.is_available():  # the kernel runs on CUDA, or interpreted on the CPU
        q, k = q.cuda(), k.cuda()
    kl = torch.tensor([300, 211], device=k.device)
    pats = [get_method("quest", token_budget=64, backend=be).select(q, k, SelectContext(layer=3, extras={"kv_lens": kl}))
            for be in ("reference", "triton")]
    assert torch.equal(pats[0].to_unit_mask(), pats[1].to_unit_mask())
    with pytest.raises(ValueError, match="backend"):
        get_method("quest", backend="cuda")
