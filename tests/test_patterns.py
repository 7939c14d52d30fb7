"""Pattern constructors against brute-force element predicates; density, set operations,
dense/Flex conversions, validation errors."""
import pytest
import torch

from sparsattn import patterns as P
from sparsattn.patterns import BlockPattern, TokenPattern


def _grid(Tq, Tk=None):
    Tk = Tq if Tk is None else Tk
    return torch.arange(Tq)[:, None], torch.arange(Tk)[None, :]


def test_causal_and_dense_masks():
    i, j = _grid(200)
    assert torch.equal(P.causal(200, block_q=64).to_dense_mask()[0, 0], j <= i)
    assert P.dense(200, block_q=32).to_dense_mask().all()
    i, j = _grid(70, 130)  # bottom-right aligned causal for q_len != kv_len
    assert torch.equal(P.causal(70, 130, block_q=32).to_dense_mask()[0, 0], j <= i + 60)


@pytest.mark.parametrize("T,window,bs", [(300, 50, 32), (257, 64, 64), (100, 1, 16)])
def test_sliding_window(T, window, bs):
    i, j = _grid(T)
    m = P.sliding_window(T, window, block_q=bs).to_dense_mask()[0, 0]
    assert torch.equal(m, (j <= i) & (i - j < window))
    m = P.sliding_window(T, window, causal=False, block_q=bs).to_dense_mask()[0, 0]
    assert torch.equal(m, (i - j).abs() < window)


def test_sink_local_matches_predicate_and_density_is_exact():
    i, j = _grid(300)
    p = P.sink_local(300, 20, 50, block_q=32)
    m = p.to_dense_mask()[0, 0]
    assert torch.equal(m, (j <= i) & ((j < 20) | (i - j < 50)))
    assert p.density == pytest.approx(float(m.sum()) / float((j <= i).sum()))
    assert P.a_shape is P.sink_local


def test_neighborhood_1d_clamped_windows_and_causal():
    T, k = 50, 7
    m = P.neighborhood_1d(T, k, block_size=16).to_dense_mask()[0, 0]
    assert (m.sum(-1) == k).all(), "every query sees exactly kernel_size keys (clamped at the edges)"
    assert m[0, :k].all() and m[-1, -k:].all() and m[25, 22:29].all()
    mc = P.neighborhood_1d(T, k, causal=True, block_size=16).to_dense_mask()[0, 0]
    i, j = _grid(T)
    assert torch.equal(mc, (j <= i) & (i - j < k))
    md = P.neighborhood_1d(T, 3, dilation=2, block_size=16).to_dense_mask()[0, 0]
    assert torch.equal(md[20].nonzero().flatten(), torch.tensor([18, 20, 22]))


def test_neighborhood_2d_brute_force():
    H, W, kh, kw = 6, 9, 3, 5
    p = P.neighborhood_2d(H, W, (kh, kw), block_size=16)
    m = p.to_dense_mask()[0, 0]
    for qi in range(H * W):
        r, c = divmod(qi, W)
        r0 = min(max(r - kh // 2, 0), H - kh)
        c0 = min(max(c - kw // 2, 0), W - kw)
        want = torch.zeros(H, W, dtype=torch.bool)
        want[r0:r0 + kh, c0:c0 + kw] = True
        assert torch.equal(m[qi], want.flatten()), qi


def test_strided_shards_union_covers_context():
    p = P.strided_shards(1024, 8, vert_stride=8, local_blocks=2, block_size=64)
    bm = p.block_mask()[0]  # [H, nq, nk]
    causal_blocks = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    assert torch.equal(bm.any(0), causal_blocks), "the heads together cover every causal block"
    assert not torch.equal(bm[0], bm[1]), "heads take different offsets"


def test_vertical_slash_columns_and_density():
    v = torch.tensor([[[0, 7, 250, 499]]])
    s = torch.tensor([[[0, 5, 100]]])
    p = P.vertical_slash(500, v, s, block_size=32)
    m = p.to_dense_mask()[0, 0]
    i, j = _grid(500)
    for col in (0, 7, 250, 499):
        assert torch.equal(m[:, col], (col <= torch.arange(500))), col  # a full vertical line
    for d in (0, 5, 100):
        assert m[d:, :][torch.arange(500 - d), torch.arange(500 - d)].all()  # the slash diagonal i - j = d
    assert p.density == pytest.approx(float(m.sum()) / float((j <= i).sum()))


def test_from_dense_mask_is_exact_and_union_intersection():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 100, 90, generator=g) < 0.3
    b = torch.rand(2, 3, 100, 90, generator=g) < 0.2
    pa, pb = P.from_dense_mask(a, block_size=16), P.from_dense_mask(b, block_size=16)
    assert torch.equal(pa.to_dense_mask(), a)
    assert torch.equal((pa | pb).to_dense_mask(), a | b)
    assert torch.equal((pa & pb).to_dense_mask(), a & b)
    c = P.from_dense_mask(a, block_size=16, causal=True)
    i, j = _grid(100, 90)
    assert torch.equal(c.to_dense_mask(), a & (j <= i - 10))


def test_from_block_mask_and_topk():
    m = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    m[0, 0, 3, 1] = m[0, 1, 2, 2] = True
    p = P.from_block_mask(m, block_size=32, q_len=128, causal=True)
    assert p.num_computed_blocks == 2
    assert torch.equal(p.block_mask(), m)
    t = P.from_topk_blocks(torch.tensor([[[[0, 0], [1, 0], [2, 9], [3, 1]]]]), q_len=128, block_size=32)
    assert t.num_computed_blocks == 1 + 2 + 1 + 2  # duplicates and out-of-range entries dropped


def test_flex_roundtrip():
    for p in (P.causal(200, block_q=64), P.sliding_window(300, 50, block_q=32),
              P.from_dense_mask(torch.rand(1, 2, 96, 96) < 0.4, block_size=32)):
        bm = p.to_flex_block_mask()
        back = P.from_flex_block_mask(bm, causal=p.causal)
        assert torch.equal(back.to_dense_mask(), p.to_dense_mask())


def test_transposed_lists():
    p = P.causal(256, block_q=64)
    tr = p.transposed()
    assert tr["q_num_blocks"][0, 0].tolist() == [4, 3, 2, 1]
    assert tr["q_indices"][0, 0, 1, :3].tolist() == [1, 2, 3]


def test_density_without_quadratic_work_at_128k():
    p = P.causal(131072, block_q=128)
    assert p.density == pytest.approx(1.0)
    w = P.sliding_window(131072, 4096, block_q=128)
    assert w.density == pytest.approx(sum(min(i + 1, 4096) for i in range(131072)) / (131072 * 131073 / 2), rel=1e-9)


def test_plot_writes_png(tmp_path):
    out = P.plot(P.neighborhood_2d(8, 8, 3, block_size=16), tmp_path / "n.png")
    assert out.stat().st_size > 1000
    out = P.plot(P.sliding_window(4096, 512, block_q=64), tmp_path / "w.png")  # block view
    assert out.stat().st_size > 1000


@pytest.mark.parametrize("mutate,field", [
    (lambda p: p.kv_indices.__setitem__((0, 0, 2, 0), 99), "kv_indices"),
    (lambda p: p.full_kv_indices.__setitem__((0, 0, 3, 0), 2), "full_kv_indices"),
    (lambda p: p.full_kv_num_blocks.__setitem__((0, 0, 3), -1), "full_kv_num_blocks"),
])
def test_validate_catches_bad_indices(mutate, field):
    p = P.causal(256, block_q=64)
    mutate(p)
    with pytest.raises(ValueError, match=field):
        p.validate()


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="block_q"):
        P.causal(100, block_q=48)
    with pytest.raises(ValueError, match="window"):
        P.sliding_window(100, 0)
    with pytest.raises(ValueError, match="q_len"):
        P.causal(-1)
    with pytest.raises(ValueError, match="block_mask"):
        P.from_block_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=32, q_len=200)
    with pytest.raises(ValueError, match="kernel_size"):
        P.neighborhood_1d(10, 11)
    with pytest.raises(ValueError, match="vertical"):
        P.vertical_slash(100, torch.tensor([[[100]]]), torch.tensor([[[0]]]), block_size=32)


def test_token_pattern():
    t = TokenPattern.from_lists([[[5, 1, 3], []], [[0], [2, 2, 9]]], kv_len=10)
    assert t.counts.tolist() == [[3, 0], [1, 2]]
    assert t.to_token_mask()[1, 1].nonzero().flatten().tolist() == [2, 9]
    bad = TokenPattern(torch.tensor([[[3, 1]]], dtype=torch.int32), torch.tensor([[2]], dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="indices"):
        bad.validate()
    with pytest.raises(ValueError, match="indices"):
        TokenPattern(torch.tensor([[[3, 12]]], dtype=torch.int32), torch.tensor([[2]], dtype=torch.int32), 10).validate()
    pages = TokenPattern.from_lists([[[1]]], kv_len=10, page_size=4)
    assert pages.to_token_mask()[0, 0].nonzero().flatten().tolist() == [4, 5, 6, 7]


def test_blockpattern_shape_errors():
    p = P.causal(128, block_q=64)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        BlockPattern(p.kv_num_blocks.long(), p.kv_indices, p.full_kv_num_blocks, p.full_kv_indices, 64, 64, 128, 128, True)
    with pytest.raises(ValueError, match="n_q_blocks"):
        BlockPattern(p.kv_num_blocks, p.kv_indices, p.full_kv_num_blocks, p.full_kv_indices, 64, 64, 300, 128, True)


def test_from_topk_blocks_equals_block_mask_of_the_selection():
    """The direct top-k builder gives the same lists as from_block_mask of the scattered selection
    (invalid, duplicate, counted-out and above-diagonal entries dropped), causal or not, any shapes."""
    g = torch.Generator().manual_seed(1)
    for q_len, kv_len, bs in [(100, 100, 16), (70, 200, 32), (200, 70, (16, 32)), (1, 300, 16)]:
        bq, bk = (bs, bs) if isinstance(bs, int) else bs
        nq, nk = -(-q_len // bq), -(-kv_len // bk)
        for causal in (True, False):
            for kk in (1, 3, nk + 2):
                ind = torch.randint(-1, nk + 1, (2, 3, nq, kk), generator=g)
                cnt = torch.randint(0, kk + 1, (2, 3, nq), generator=g)
                for c in (None, cnt):
                    a = P.from_topk_blocks(ind, q_len=q_len, kv_len=kv_len, block_size=bs, causal=causal, counts=c)
                    valid = (ind >= 0) & (ind < nk)
                    if c is not None:
                        valid &= torch.arange(kk) < c[..., None]
                    sel = torch.zeros(2, 3, nq, nk + 1, dtype=torch.bool)
                    sel.scatter_(-1, torch.where(valid, ind, nk), True)
                    b = P.from_block_mask(sel[..., :nk], block_size=(bq, bk), q_len=q_len, kv_len=kv_len, causal=causal)
                    assert torch.equal(a.to_dense_mask(), b.to_dense_mask())
                    for cf, lf in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
                        assert torch.equal(getattr(a, cf), getattr(b, cf))
                        la, lb = getattr(a, lf), getattr(b, lf)
                        w = max(la.shape[-1], lb.shape[-1])
                        pad = lambda t: torch.nn.functional.pad(t, (0, w - t.shape[-1]))  # noqa: E731
                        assert torch.equal(pad(la), pad(lb))
    with pytest.raises(ValueError, match="indices"):
        P.from_topk_blocks(torch.zeros(1, 1, 2, 3), q_len=100, block_size=64)


def test_tile_dedup_matches_exact_unique():
    from sparsattn.patterns import _unique_tiles

    g = torch.Generator().manual_seed(0)
    base = torch.rand(7, 4096, generator=g) < 0.5
    rows = base[torch.randint(0, 7, (300,), generator=g)]
    u, inv = _unique_tiles(rows)
    assert torch.equal(u[inv], rows)
    assert u.shape[0] == torch.unique(rows, dim=0).shape[0]


def test_vertical_slash_accepts_lists_and_numpy():
    import numpy as np

    want = P.vertical_slash(64, torch.tensor([[[3, 10]]]), torch.tensor([[[0, 5]]]), block_size=32)
    for vert, sl in (([[[3, 10]]], [[[0, 5]]]), (np.array([[[3, 10]]]), (((0, 5),),))):
        got = P.vertical_slash(64, vert, sl, block_size=32)
        assert torch.equal(got.to_dense_mask(), want.to_dense_mask())
    got = P.vertical_slash(64, [[[3, 10]]], [[[0, 5]]], vertical_counts=[[1]], slash_counts=[[2]], block_size=32)
    assert got.columns.counts.tolist() == [[1]]
    with pytest.raises(ValueError, match="vertical: expected an integer tensor"):
        P.vertical_slash(64, [[[3.5]]], [[[0]]], block_size=32)
    with pytest.raises(ValueError, match="vertical: expected an integer tensor"):
        P.vertical_slash(64, [[[3], [1, 2]]], [[[0]]], block_size=32)
    with pytest.raises(ValueError, match="slash"):
        P.vertical_slash(64, [[[3]]], "diagonals", block_size=32)


def test_derived_data_follows_in_place_changes():
    """Cached derivatives (transposed lists, pair counts) are rebuilt after an in-place change."""
    p = P.causal(64, block_q=32)
    d0, t0 = p.density, p.transposed()["q_num_blocks"].clone()
    assert p.transposed() is p.transposed()  # cached while unchanged
    p.kv_num_blocks.zero_()  # drop the diagonal blocks
    assert p.density < d0
    assert not torch.equal(p.transposed()["q_num_blocks"], t0)
