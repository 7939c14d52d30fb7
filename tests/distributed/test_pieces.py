"""Single-process pieces of context parallelism: layouts, sub-patterns (each rank's local pattern
equals the global element mask on its rows and keys), the log-sum-exp merge, strategy choice."""
import pytest
import torch

from sparsattn import attention
from sparsattn import patterns as P
from sparsattn.distributed import ShardLayout, lse_merge, make_layout, shard, unshard
from sparsattn.distributed.plan import build_plan


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("T,world", [(300, 2), (300, 4), (80, 4), (0, 3), (1000, 3)])
def test_layout_roundtrip(kind, T, world):
    lay = ShardLayout(T, world, kind, 32)
    x = torch.arange(T).view(1, 1, T, 1).float()
    parts = [shard(x, lay, r) for r in range(world)]
    assert sum(p.shape[2] for p in parts) == T
    assert torch.equal(unshard(parts, lay), x)
    assert torch.equal(torch.sort(lay.order()).values, torch.arange(T))
    for r in range(world):  # every shard is block aligned except at its own end
        pos = lay.positions(r)
        assert torch.equal(parts[r].flatten(), pos.float())
        starts = [a for a, z in lay.rank_ranges(r) if z > a]
        assert all(a % 32 == 0 for a in starts)


def test_layout_errors():
    with pytest.raises(ValueError, match="layout"):
        ShardLayout(10, 2, "striped", 32)
    with pytest.raises(ValueError, match="unit"):
        ShardLayout(10, 2, "zigzag", 48)
    with pytest.raises(ValueError, match="x: expected 10 tokens"):
        shard(torch.zeros(1, 1, 9, 1), ShardLayout(10, 2), 0)
    with pytest.raises(ValueError, match="layout.unit"):
        make_layout(ShardLayout(100, 2, "zigzag", 16), 100, 2, 32)


def _pats(T):
    g = torch.Generator().manual_seed(0)
    return [P.causal(T, block_q=16, block_k=32), P.sliding_window(T, 40, block_q=32, block_k=16),
            P.dense(T, block_q=16), P.sliding_window(T, 50, causal=False, block_q=16),
            P.from_dense_mask(torch.rand(1, 2, T, T, generator=g) < 0.1, block_size=16, causal=True)]


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("strategy", ["ring", "fetch"])
def test_sub_patterns_equal_global_mask(kind, strategy):
    T = 300
    for p in _pats(T):
        gm = p.to_dense_mask()[0]
        for W in (2, 3):
            lay = ShardLayout(T, W, kind, max(p.block_q, p.block_k))
            for r in range(W):
                pl = build_plan(p, lay, r, strategy)
                covered = torch.zeros(gm.shape[0], lay.rank_len(r), T, dtype=torch.bool)
                for s in range(W):
                    sub = (pl.ring_sub if strategy == "ring" else pl.fetch_sub).get(s)
                    if strategy == "ring" or s == r:
                        pos_k = lay.positions(s)
                    else:
                        b = pl.fetch_blocks[r][s]
                        pos_k = (b[:, None] * p.block_k + torch.arange(p.block_k)[None]).flatten()
                        pos_k = pos_k[pos_k < T]
                    exp = gm[:, lay.positions(r)][:, :, pos_k]
                    if sub is None:
                        assert not exp.any()
                        continue
                    assert not sub.causal
                    got = sub.validate().to_dense_mask()[0]
                    assert torch.equal(got, exp.expand_as(got))
                    covered[:, :, pos_k] |= got
                # the parts together cover the rank's rows of the global mask exactly
                assert torch.equal(covered, gm[:, lay.positions(r)].expand_as(covered))


def test_lse_merge_equals_attention_on_union():
    T, D = 70, 8
    q, k, v = torch.randn(1, 2, T, D), torch.randn(1, 2, T, D), torch.randn(1, 2, T, D)
    o, l = attention(q, k, v, causal=True, return_lse=True, backend="reference")
    mask = P.causal(T, block_q=16).to_dense_mask()
    acc = (None, None)
    for a, z in ((0, 16), (16, 40), (40, 70), (70, 70)):
        p = P.from_dense_mask(mask[..., a:z].contiguous(), block_size=16) if z > a else None
        if p is None or p.num_computed_blocks == 0:
            continue
        oo, ll = attention(q, k[:, :, a:z], v[:, :, a:z], p, return_lse=True, backend="reference")
        acc = lse_merge(acc[0], acc[1], oo, ll)
    torch.testing.assert_close(acc[0], o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc[1], l, atol=1e-5, rtol=1e-5)
    # rows with no key in either part stay 0 / -inf (no NaN)
    e_o, e_l = lse_merge(torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), float("-inf")),
                         torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), float("-inf")))
    assert not torch.isnan(e_o).any() and torch.isinf(e_l).all()


def test_skip_saves_bytes():
    """A causal contiguous split: the ring skips the shards no later rank needs (half the dense
    ring's traffic) and a sliding window only fetches the neighbour's edge blocks."""
    T, W = 1024, 4
    lay = ShardLayout(T, W, "contiguous", 64)
    causal = P.causal(T, block_q=64)
    ring = sum(build_plan(causal, lay, r, "ring").bytes_estimate("ring", 1, 1) for r in range(W))
    assert ring == T // W * (W * (W - 1) // 2)  # dense ring: T // W * W * (W - 1)
    win = P.sliding_window(T, 128, block_q=64)
    fetch = [build_plan(win, lay, r, "fetch").bytes_estimate("fetch", 1, 1) for r in range(W)]
    assert fetch == [0, 128, 128, 128]


def test_rank_rows_gives_the_single_device_shard():
    from sparsattn.distributed import rank_rows

    T = 200
    p = P.sliding_window(T, 48, block_q=16, block_k=32)
    q, k, v = torch.randn(1, 2, T, 8), torch.randn(1, 1, T, 8), torch.randn(1, 1, T, 8)
    full = attention(q, k, v, p, backend="reference")
    lay = ShardLayout(T, 3, "zigzag", 32)
    for r in range(3):
        sub = rank_rows(p, lay, r)
        got = attention(shard(q, lay, r), k, v, sub, backend="reference")
        torch.testing.assert_close(got, shard(full, lay, r), atol=1e-5, rtol=1e-5)


def test_auto_strategy_by_bytes():
    from sparsattn.distributed import choose_strategy
    from sparsattn.distributed.bench import make_pattern

    T = 8192

    def pick(kind, dens, W, Hq=32, Hkv=8):
        p = make_pattern(kind, T, dens, 64, Hkv, "cpu")
        lay = make_layout("zigzag", T, W, 64)
        plans = [build_plan(p, lay, r, "shared") for r in range(W)]
        return choose_strategy("auto", plans, Hq, Hkv, 128, 2, 1, W, p.heads)[0]

    assert pick("local", 0.05, 4) == "fetch"      # moves ~6% of the dense ring
    assert pick("dense", 1.0, 2) == "ring"        # nothing to skip; Ulysses moves 2.5x
    assert pick("dense", 1.0, 8) == "ulysses"     # (1 + 32/8) / 8 of the dense ring
    assert pick("dense", 1.0, 8, Hq=12, Hkv=3) == "ring"  # heads do not divide the ranks
    with pytest.raises(ValueError, match="ulysses"):
        choose_strategy("ulysses", None, 12, 3, 64, 2, 1, 8, 1)
    with pytest.raises(ValueError, match="strategy"):
        choose_strategy("star", None, 12, 3, 64, 2, 1, 8, 1)
