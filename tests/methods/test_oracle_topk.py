"""oracle_topk: exact top-k blocks; recall >= other block selections at equal block budget."""
import math

import pytest
import torch

from sparsattn.kernels import estimate as E
from sparsattn.methods import get_method
from sparsattn.methods.minference import attention_recall


def _qk(T=320, Hq=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, Hq, T, D, generator=g) * 2, torch.randn(1, Hkv, T, D, generator=g) * 2


def test_selects_exact_topk_blocks_plus_diagonal():
    q, k = _qk()
    p = get_method("oracle_topk", block_size=32, top_k=3, reduce="sum").select(q, k)
    assert p.heads == 4
    sel = p.block_mask()[0]
    s = E.exact_block_scores(q, k, 32, reduce="sum")[0]
    nq = sel.shape[1]
    for h in range(4):
        for i in range(nq):
            n = min(3, i + 1)
            assert int(sel[h, i].sum()) == n
            assert sel[h, i, i]  # diagonal always kept
            others = s[h, i, :i].clone()
            want = set(torch.topk(others, n - 1).indices.tolist()) if n > 1 else set()
            got = set(sel[h, i, :i].nonzero().flatten().tolist())
            assert got == want


def test_density_budget_per_row():
    q, k = _qk()
    p = get_method("oracle_topk", block_size=32, density=0.25).select(q, k)
    cnt = p.block_mask()[0].sum(-1)  # [H, nq]
    want = torch.tensor([max(1, math.ceil(0.25 * (i + 1))) for i in range(cnt.shape[1])])
    assert torch.equal(cnt, want.expand_as(cnt))


def test_recall_beats_other_selections_at_equal_budget():
    q, k = _qk(T=512, seed=3)
    K = 4
    oracle = get_method("oracle_topk", block_size=32, top_k=K, reduce="sum").select(q, k)
    bs = get_method("block_sparse", block_size=32, top_k=K).select(q, k)
    r_or = attention_recall(q, k, oracle)
    r_bs = attention_recall(q, k, bs)
    assert (r_or >= r_bs - 1e-9).all()
    # random K blocks (diagonal included) per query block
    g = torch.Generator().manual_seed(0)
    nq = oracle.n_q_blocks
    idx = torch.stack([torch.cat([torch.tensor([i]), torch.randint(0, i + 1, (K - 1,), generator=g)]) for i in range(nq)])
    from sparsattn import patterns

    rnd = patterns.from_topk_blocks(idx[None, None], q_len=512, block_size=32)
    assert (r_or > attention_recall(q, k, rnd)).all()
    assert float(r_or.min()) > float(r_bs.mean()) - 0.2  # sanity: oracle is a strong selection


def test_budget_clamp_warns_and_bad_values():
    q, k = _qk(T=100)
    with pytest.warns(UserWarning, match="top_k"):
        p = get_method("oracle_topk", block_size=32, top_k=99).select(q, k)
    assert abs(p.density - 1.0) < 1e-12
    for bad in ({"density": 0.0}, {"density": 1.5}, {"reduce": "mean"}, {"top_k": 0}, {"block_size": 48},
                {"top_k": None, "density": None}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            get_method("oracle_topk", **bad)



@pytest.mark.parametrize("cfg", [{}, {"top_k": 1}, {"density": 0.01, "block_size": 32}])
def test_chunked_prefill_keeps_both_diagonal_blocks(cfg):
    # issue 10: 64 queries at the end of 300 keys straddle key blocks 3 and 4; a budget of one
    # block kept only one of them and left 80 (head, row) pairs without any key
    import warnings

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 2, 300, 64, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = get_method("oracle_topk", **cfg).select(q, k)
    m = p.to_dense_mask()
    rows = torch.arange(64)
    assert m[:, :, rows, rows + 236].all()
    assert int((~m.any(-1)).sum()) == 0
    if p.block_q == 64:
        bm = p.block_mask()[0]
        assert bool(bm[:, 0, 3].all()) and bool(bm[:, 0, 4].all())
