"""KVCache: append with different lengths, gather, per-head eviction, attend, paged layout, offload."""
import pytest
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.kv import KVCache
from sparsattn.patterns import TokenPattern


def _fill(cache, layer, B, H, D, lens, gen, steps=3):
    """Append prefill chunks + single tokens; return the per-sequence token lists (k, v)."""
    ks = [[] for _ in range(B)]
    vs = [[] for _ in range(B)]
    for step in range(steps):
        t = 5 if step == 0 else 1
        k = torch.randn(B, H, t, D, generator=gen)
        v = torch.randn(B, H, t, D, generator=gen)
        ln = torch.tensor(lens) if step == 0 else torch.ones(B, dtype=torch.long)
        cache.append(layer, k, v, lens=ln)
        for b in range(B):
            ks[b].append(k[b, :, : int(ln[b])])
            vs[b].append(v[b, :, : int(ln[b])])
    return [torch.cat(x, 1) for x in ks], [torch.cat(x, 1) for x in vs]


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_append_get_attend_matches_dense(layout):
    gen = torch.Generator().manual_seed(0)
    B, H, G, D = 3, 2, 4, 16
    cache = KVCache(2, B, H, D, dtype=torch.float32, layout=layout, page_size=4)
    ks, vs = _fill(cache, 1, B, H, D, [5, 2, 0], gen)
    assert cache.kv_lens(1).tolist() == [7, 4, 2]
    k, v = cache.get(1)
    q = torch.randn(B, H * G, D, generator=gen)
    out = cache.attend(1, q)  # triton (interpreted on the CPU) when available, else the reference
    for b in range(B):
        n = ks[b].shape[1]
        assert torch.equal(k[b, :, :n], ks[b]) and torch.equal(v[b, :, :n], vs[b])
        ref, _ = dense_reference(q[b:b + 1, :, None], ks[b][None], vs[b][None])
        assert torch.allclose(out[b], ref[0, :, 0].float(), atol=1e-5)
    # gather of a slot-indexed pattern returns exactly those rows
    pat = TokenPattern.from_lists([[[0, 1], [1]], [[3], [0, 2]], [[1], []]], k.shape[2])
    gk, gv = cache.gather(1, pat)
    assert torch.equal(gk[1, 1, :2], ks[1][1, [0, 2]]) and torch.equal(gv[0, 0, :2], vs[0][0, [0, 1]])
    assert cache.nbytes() > 0 and cache.nbytes(0) == 0


def test_evict_per_head_and_shrink():
    gen = torch.Generator().manual_seed(1)
    B, H, D = 2, 2, 8
    cache = KVCache(1, B, H, D, dtype=torch.float32)
    ks, vs = _fill(cache, 0, B, H, D, [5, 5], gen, steps=6)  # 10 tokens each
    before = cache.nbytes()
    keep = torch.zeros(B, H, cache.get(0)[0].shape[2], dtype=torch.bool)
    keep[0, 0, [0, 3, 9]] = True
    keep[0, 1, :10] = True
    keep[1, 0, [9]] = True
    cache.evict(0, keep)
    cache.shrink()
    assert cache.lengths(0).tolist() == [[3, 10], [1, 0]]
    assert cache.positions(0)[0, 0, :3].tolist() == [0, 3, 9]
    k, _ = cache.get(0)
    assert torch.equal(k[0, 0, :3], ks[0][0, [0, 3, 9]])
    assert cache.nbytes() < before
    # attention over the per-head lengths equals dense attention on each head's kept tokens
    q = torch.randn(B, H, D, generator=gen)
    out, lse = cache.attend(0, q, backend="reference", return_lse=True)
    ref, _ = dense_reference(q[:1, :1, None], ks[0][None, :1, [0, 3, 9]], vs[0][None, :1, [0, 3, 9]])
    assert torch.allclose(out[0, 0], ref[0, 0, 0].float(), atol=1e-5)
    assert (out[1, 1] == 0).all() and torch.isneginf(lse[1, 1])


def test_paged_eviction_is_refused():
    cache = KVCache(1, 1, 1, 8, layout="paged")
    cache.append(0, torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    with pytest.raises(ValueError, match="layout"):
        cache.evict(0, torch.ones(1, 1, 16, dtype=torch.bool))


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_offload_round_trip_and_prefetch(layout):
    gen = torch.Generator().manual_seed(2)
    B, H, D = 2, 2, 8
    cache = KVCache(1, B, H, D, dtype=torch.bfloat16, layout=layout, page_size=4)
    _fill(cache, 0, B, H, D, [5, 3], gen, steps=4)
    k0, v0 = [x.clone() for x in cache.get(0)]
    T = k0.shape[2]
    cache.offload(0)
    assert cache.layers[0].k.device.type == "cpu"
    with pytest.raises(ValueError, match="offloaded"):
        cache.attend(0, torch.randn(B, H, D).bfloat16())
    pat = TokenPattern.from_lists([[[0, 2, 7], [1]], [[0, 5], [4]]], T)
    pf = cache.prefetch(0, pat).wait()
    assert pf.pattern.counts.tolist() == [[3, 1], [2, 1]]
    assert torch.equal(pf.k[0, 0, :3], k0[0, 0, [0, 2, 7]]) and torch.equal(pf.v[1, 0, :2], v0[1, 0, [0, 5]])
    q = torch.randn(B, H, D, generator=gen).bfloat16()
    from sparsattn.kernels.sparse_decode import sparse_decode_attention
    a = sparse_decode_attention(q, pf.k, pf.v, pf.pattern, backend="reference")
    cache.fetch(0)
    b = cache.attend(0, q, pat, backend="reference")
    assert torch.equal(a, b)
    k1, v1 = cache.get(0)
    assert torch.equal(k0, k1) and torch.equal(v0, v1)  # exact round trip
    # a selection shared by every kv head (pattern heads 1) is fetched for each head
    cache.offload(0)
    shared = TokenPattern.from_lists([[[1, 3]], [[0]]], T)
    pf = cache.prefetch(0, shared).wait()
    assert pf.k.shape[1] == H and torch.equal(pf.k[0, 1, :2], k0[0, 1, [1, 3]]) and torch.equal(pf.v[1, 1, :1], v0[1, 1, [0]])
    cache.fetch(0)
    gk, gv = cache.gather(0, shared)
    for b, n in ((0, 2), (1, 1)):
        assert torch.equal(gk[b, :, :n], pf.k[b, :, :n]) and torch.equal(gv[b, :, :n], pf.v[b, :, :n])


def test_append_validation():
    cache = KVCache(1, 2, 2, 8)
    with pytest.raises(ValueError, match="k"):
        cache.append(0, torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))
    with pytest.raises(ValueError, match="lens"):
        cache.append(0, torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), lens=[2, 0])
    with pytest.raises(ValueError, match="layer"):
        cache.append(3, torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))


def test_load_layer_adopts_rows_like_append():
    """Rows loaded slot-major (per-head lengths) behave like the same tokens appended: same slots,
    positions, attention; slots past the lengths are cleared; bad shapes raise."""
    gen = torch.Generator().manual_seed(3)
    B, H, T, D = 2, 2, 6, 8
    k, v = torch.randn(B, H, T, D, generator=gen), torch.randn(B, H, T, D, generator=gen)
    lens = torch.tensor([[6, 4], [2, 5]])
    pos = torch.arange(T).expand(B, H, T).clone()
    ref = KVCache(1, B, H, D, dtype=torch.float32)
    ref.append(0, k, v)
    cap = ref.get(0)[0].shape[2]
    ref.evict(0, torch.arange(cap)[None, None, :] < lens[..., None])
    ref.shrink(0)
    got = KVCache(1, B, H, D, dtype=torch.float32)
    got.load_layer(0, k, v, lens, pos, torch.tensor([T, T]))
    assert torch.equal(got.lengths(0), ref.lengths(0)) and torch.equal(got.seq_lens(0), ref.seq_lens(0))
    assert torch.equal(got.positions(0), ref.positions(0))
    assert torch.equal(got.get(0)[0], ref.get(0)[0]) and got.get(0)[1][1, 0, 2:].abs().max() == 0
    q = torch.randn(B, 4, D, generator=gen)
    torch.testing.assert_close(got.attend(0, q, backend="reference"), ref.attend(0, q, backend="reference"))
    with pytest.raises(ValueError, match="lengths"):
        got.load_layer(0, k, v, lens + 3, pos, torch.tensor([T, T]))
    with pytest.raises(ValueError, match="positions"):
        got.load_layer(0, k, v, lens, pos[:, :, :3], torch.tensor([T, T]))
    with pytest.raises(ValueError, match="log_weight"):
        got.load_layer(0, k, v, lens, pos, torch.tensor([T, T]), log_weight=torch.zeros(B, H, 2))


def test_attend_skips_selected_slots_past_a_heads_own_length():
    """One tensor with per-head lengths: a pattern naming every slot equals attending each head's own
    rows (the kernel alone would read the empty slots up to the sequence's longest head)."""
    from sparsattn.kv import KVCache
    from sparsattn.patterns import TokenPattern

    g = torch.Generator().manual_seed(0)
    c = KVCache(1, 2, 2, 16, dtype=torch.float32, group_waste=1.0)  # never split into head groups
    k = torch.randn(2, 2, 40, 16, generator=g)
    c.append(0, k, torch.randn(2, 2, 40, 16, generator=g))
    keep = torch.ones(2, 2, 40, dtype=torch.bool)
    keep[:, 1, 25:] = False  # head 1 keeps 25 slots, head 0 all 40
    c.evict(0, keep)
    q = torch.randn(2, 4, 16, generator=g)
    T = c.get(0)[0].shape[2]
    every = TokenPattern(torch.arange(T, dtype=torch.int32).expand(2, 2, T).contiguous(),
                         torch.full((2, 2), T, dtype=torch.int32), T)
    torch.testing.assert_close(c.attend(0, q, every, backend="reference"), c.attend(0, q, backend="reference"))


def test_load_layer_adopt_keeps_the_tensors_and_equals_the_copying_load():
    """load_layer(adopt=True) (the as_cache_policy path) stores the given cleared rows without a copy and
    reads back exactly like the default load, which clears slots beyond lengths in a copy."""
    g = torch.Generator().manual_seed(3)
    B, H, T, D = 2, 3, 7, 4
    lengths = torch.tensor([[7, 3, 0], [5, 5, 1]])
    dead = torch.arange(T) >= lengths[..., None]
    k = torch.randn(B, H, T, D, generator=g).masked_fill(dead[..., None], 0)
    v = torch.randn(B, H, T, D, generator=g).masked_fill(dead[..., None], 0)
    pos = torch.arange(T).expand(B, H, T).masked_fill(dead, -1).contiguous()
    seen = torch.tensor([7, 5])
    a = KVCache(1, B, H, D, dtype=torch.float32)
    b = KVCache(1, B, H, D, dtype=torch.float32)
    a.load_layer(0, k, v, lengths, pos, seen, adopt=True)
    b.load_layer(0, k + 0, v + 0, lengths, pos.clone(), seen)
    assert a.get(0)[0] is k and a.get(0)[1] is v
    assert b.get(0)[0] is not k
    for x, y in zip(a.get(0), b.get(0)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(a.positions(0), b.positions(0), rtol=0, atol=0)
    q = torch.randn(B, 6, D, generator=g)
    torch.testing.assert_close(a.attend(0, q, backend="reference"), b.attend(0, q, backend="reference"))
