"""HiP: the hierarchical search finds planted high-score key blocks (smooth, local structure)."""
import pytest
import torch

from sparsattn.methods import get_method


def _planted(T=1024, D=16, centers=((700, 300), (900, 120)), width=40.0, seed=0):
    """query blocks starting at ``qs`` look for a bump of keys around token ``c`` (smooth in j)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, T, D, generator=g) * 0.1
    k = torch.randn(1, 1, T, D, generator=g) * 0.1
    j = torch.arange(T, dtype=torch.float32)
    for n, (qs, c) in enumerate(centers):
        u = torch.zeros(D)
        u[n] = 1.0
        q[0, 0, qs:qs + 64] += u * 3.0
        k[0, 0, :, n] += 4.0 * torch.exp(-((j - c) ** 2) / (2 * width ** 2))
    return q, k


def test_finds_planted_blocks():
    q, k = _planted()
    m = get_method("hip", mask_k=64, block_size_q=64, block_k=16, sink_token_size=16, sliding_window_size=64)
    idx, ok = m.search(q, k)
    found_700 = set(idx[0, 0, 700 // 64][ok[0, 0, 700 // 64]].tolist())
    found_900 = set(idx[0, 0, 900 // 64][ok[0, 0, 900 // 64]].tolist())
    assert 300 // 16 in found_700, sorted(found_700)
    assert 120 // 16 in found_900, sorted(found_900)
    p = m.select(q, k)
    sel = p.block_mask()[0, 0]
    assert sel[700 // 64, 300 // 16] and sel[900 // 64, 120 // 16]
    assert sel[:, 0].all()  # sinks
    assert p.density < 0.3


def test_search_matches_bruteforce_topk_on_smooth_scores():
    # per query block, HiP's K blocks should overlap the exact top-K blocks by max q.k
    T, D = 1024, 16
    g = torch.Generator().manual_seed(1)
    # smooth keys: random walk, so neighbouring keys have similar scores (HiP's locality assumption)
    k = torch.cumsum(torch.randn(1, 1, T, D, generator=g), 2) * 0.2
    q = torch.randn(1, 1, T, D, generator=g)
    m = get_method("hip", mask_k=128, block_size_q=64, block_k=16, sink_token_size=0, sliding_window_size=1)
    idx, ok = m.search(q, k)
    s = torch.einsum("bhid,bhjd->bhij", q, k)
    nq, nk, K = T // 64, T // 16, 8
    hits, total = 0, 0
    for i in range(4, nq):
        blk = s[0, 0, i * 64:(i + 1) * 64].view(64, nk, 16).amax((0, 2))
        causal = torch.arange(nk) * 16 <= (i + 1) * 64 - 1
        blk = blk.masked_fill(~causal, float("-inf"))
        true = set(torch.topk(blk, K).indices.tolist())
        got = set(idx[0, 0, i][ok[0, 0, i]].tolist())
        assert len(got) == K
        hits += len(true & got)
        total += K
    assert hits / total > 0.6, hits / total
    # the search touches O(K log N) representative keys, far less than the exact top-K needs


def test_gqa_heads_and_errors():
    q = torch.randn(1, 4, 300, 16)
    k = torch.randn(1, 2, 300, 16)
    p = get_method("hip", mask_k=64, block_size_q=32, sliding_window_size=32).select(q, k)
    assert p.heads == 4 and p.block_k == 16 and p.block_q == 32
    with pytest.raises(ValueError, match="mask_k"):
        get_method("hip", mask_k=100, block_k=16)
    with pytest.raises(ValueError, match="block_k"):
        get_method("hip", block_k=3)
    assert get_method("hip").block_k == 2  # the paper's block_size_k
    with pytest.warns(UserWarning, match="mask_k"):
        get_method("hip").select(q, k)


def _node_reference(idx, ok, unit, Tq, Tk, bq):
    """Element mask of HiP's nodes (``unit`` keys each) per query block, causal: plain loops."""
    B, H, nq, K = idx.shape
    nu = -(-Tk // unit)
    ref = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for qb in range(nq):
                keys = torch.zeros(nu * unit, dtype=torch.bool)
                for u, o in zip(idx[b, h, qb].tolist(), ok[b, h, qb].tolist()):
                    if o:
                        keys[u * unit:(u + 1) * unit] = True
                for i in range(qb * bq, min(Tq, qb * bq + bq)):
                    ref[b, h, i] = keys[:Tk] & (torch.arange(Tk) <= i + Tk - Tq)
    return ref


@pytest.mark.parametrize("Tq,Tk,unit,bq", [(100, 333, 2, 32), (130, 130, 1, 64), (5, 77, 8, 16)])
def test_nodes_to_pattern_is_token_exact(Tq, Tk, unit, bq):
    from sparsattn.methods.hip import nodes_to_pattern

    g = torch.Generator().manual_seed(Tq)
    nu, nq, K = -(-Tk // unit), -(-Tq // bq), 7
    idx = torch.stack([torch.randperm(nu, generator=g)[:K] for _ in range(2 * 3 * nq)]).view(2, 3, nq, K)
    ok = torch.rand(2, 3, nq, K, generator=g) > 0.2
    p = nodes_to_pattern(idx, ok, unit, Tq, Tk, bq, 16)
    p.validate()
    assert torch.equal(p.to_dense_mask(), _node_reference(idx, ok, unit, Tq, Tk, bq))


def test_paper_block_size_keeps_mask_k_tokens():
    # issue 10: block_k = 2 (HiP's block_size_k) works: the pattern keeps exactly the searched
    # 2-key nodes (mask_k keys per query block) plus sinks and window, token-exact
    q, k = _planted()
    m = get_method("hip", mask_k=64, block_size_q=64, block_k=2, sink_token_size=0, sliding_window_size=1)
    idx, ok = m.search(q, k)
    assert int(ok.sum(-1).min()) == 32  # mask_k / block_k nodes per query block
    p = m.select(q, k)
    assert p.block_k == 16 and p.mask_bank is not None
    want = _node_reference(idx, ok, 2, 1024, 1024, 64)
    rows = torch.arange(1024)
    want[:, :, rows, rows] = True  # the window of 1 (the diagonal)
    assert torch.equal(p.to_dense_mask(), want)
    assert 300 // 2 in set(idx[0, 0, 700 // 64][ok[0, 0, 700 // 64]].tolist())
