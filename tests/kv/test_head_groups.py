"""KVCache head groups: storage follows per-head lengths after per-head eviction; reads and attention are
unchanged (compared with the same cache kept in one tensor, ``group_waste=1``)."""
import pytest
import torch

from sparsattn.kv import KVCache, MoAPolicy, RazorAttentionPolicy, StreamingLLMPolicy, ZipVLPolicy
from sparsattn.kv.groups import head_groups
from sparsattn.patterns import TokenPattern


def test_head_groups_rule():
    assert head_groups([8192, 4005, 4005, 4005], 0.1) == [[0], [1, 2, 3]]
    # 10 + 9: 5% padding (joins); + 5: 20% > 10% -> new group; 0 cannot join a group of 5
    assert head_groups([10, 9, 5, 0], 0.1) == [[0, 1], [2], [3]]
    assert head_groups([5, 10, 9, 0], 0.1) == [[0], [1, 2], [3]]
    assert head_groups([10, 9, 5, 0], 1.0) == [[0, 1, 2, 3]]
    assert head_groups([7, 7, 7], 0.0) == [[0, 1, 2]] and head_groups([0, 0], 0.1) == [[0, 1]]
    with pytest.raises(ValueError, match="group_waste"):
        KVCache(1, 1, 1, 8, group_waste=1.5)


def _pair(B, H, D, lens, seed):
    """The same tokens in a grouping cache and in a single-tensor one (group_waste=1)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, max(lens), D, generator=gen)
    v = torch.randn(B, H, max(lens), D, generator=gen)
    caches = [KVCache(1, B, H, D, dtype=torch.float32), KVCache(1, B, H, D, dtype=torch.float32, group_waste=1.0)]
    for c in caches:
        c.append(0, k, v, lens=torch.tensor(lens))
    return caches, gen


def _same_reads(grp, one):
    assert grp.layers[0].groups is not None and one.layers[0].groups is None
    assert torch.equal(grp.lengths(0), one.lengths(0)) and torch.equal(grp.seq_lens(0), one.seq_lens(0))
    for a, b in zip(grp.get(0), one.get(0)):
        assert torch.equal(a, b)
    assert torch.equal(grp.positions(0), one.positions(0))
    la, lb = grp.log_weights(0), one.log_weights(0)
    assert (la is None) == (lb is None) and (la is None or torch.equal(la, lb))


def _same_attention(grp, one, gen, Hq, D):
    B, H = grp.batch, grp.kv_heads
    q = torch.randn(B, Hq, D, generator=gen)
    a, la = grp.attend(0, q, backend="reference", return_lse=True)
    b, lb = one.attend(0, q, backend="reference", return_lse=True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    # a kv-head pattern and a shared (heads 1) pattern selecting live slots only
    n = grp.lengths(0)
    T = grp.get(0)[0].shape[2]
    rows = [[list(range(0, int(n[b_, h]), 3)) for h in range(H)] for b_ in range(B)]
    shared = [[list(range(0, int(n[b_].min()), 2))] for b_ in range(B)]
    for lists in (rows, shared):
        pat = TokenPattern.from_lists(lists, T)
        torch.testing.assert_close(grp.attend(0, q, pat, backend="reference"),
                                   one.attend(0, q, pat, backend="reference"), rtol=1e-6, atol=1e-6)
        ga, gb = grp.gather(0, pat), one.gather(0, pat)
        assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])


@pytest.mark.parametrize("name", ["razor", "moa"])
def test_grouped_cache_attends_like_one_tensor(name):
    B, H, G, D = 2, 4, 2, 16
    (grp, one), gen = _pair(B, H, D, [90, 61], seed=0)
    if name == "razor":
        pol = RazorAttentionPolicy(retrieval_heads={0: [0]}, n_sink=2, compression=8.0, min_window=10)
    else:
        pol = MoAPolicy(alpha=[[40.0, 8.0, 8.0, 20.0]], beta=[[0.3, 0.0, 0.05, 0.1]], n_sink=4)
    for step in range(4):
        ra, rb = pol.apply(grp, 0), pol.apply(one, 0)
        assert ra == rb
        _same_reads(grp, one)
        assert grp.nbytes(0) < one.nbytes(0)
        _same_attention(grp, one, gen, H * G, D)
        # decode steps after grouping: appends go to every group (and grow them)
        for t in range(3):
            k, v = torch.randn(B, H, 1 + step, D, generator=gen), torch.randn(B, H, 1 + step, D, generator=gen)
            lens = torch.tensor([1 + step, step])
            grp.append(0, k, v, lens=lens)
            one.append(0, k, v, lens=lens)
            _same_reads(grp, one)
            _same_attention(grp, one, gen, H * G, D)
    if name == "razor":  # retrieval head 0 alone, the compressed heads together
        assert [g.heads.tolist() for g in grp.layers[0].groups] == [[0], [1, 2, 3]]


def test_grouped_cache_offload_write_slot_evict_and_triton():
    B, H, G, D = 2, 4, 2, 16
    (grp, one), gen = _pair(B, H, D, [70, 52], seed=1)
    pol = RazorAttentionPolicy(retrieval_heads={0: [2]}, n_sink=2, compression=8.0, min_window=8)
    for c in (grp, one):
        pol.apply(c, 0)
    assert len(grp.layers[0].groups) == 2
    # offload -> prefetch -> append on host -> fetch: same rows as the single-tensor cache
    T = grp.get(0)[0].shape[2]
    pat = TokenPattern.from_lists([[[0, 3, 9], [1, 2], [0, 40, 69], [5]], [[4], [0, 1], [51], [2, 6]]], T)
    for c in (grp, one):
        c.offload(0)
    with pytest.raises(ValueError, match="offloaded"):
        grp.attend(0, torch.randn(B, H * G, D))
    pa, pb = grp.prefetch(0, pat).wait(), one.prefetch(0, pat).wait()
    assert torch.equal(pa.pattern.counts, pb.pattern.counts)
    for x, y in ((pa.k, pb.k), (pa.v, pb.v), (pa.log_weight, pb.log_weight)):
        cnt = pa.pattern.counts
        ok = torch.arange(x.shape[2]) < cnt[..., None]
        assert torch.equal(x[ok], y[ok])
    k, v = torch.randn(B, H, 2, D, generator=gen), torch.randn(B, H, 2, D, generator=gen)
    for c in (grp, one):
        c.append(0, k, v)
        c.fetch(0)
    assert grp.layers[0].groups[0].k.device.type == "cpu"
    _same_reads(grp, one)
    # merged slots written into groups, then a per-head eviction and a shrink (regrouping)
    b, h = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 3])
    ks, vs, lw = torch.randn(3, D, generator=gen), torch.randn(3, D, generator=gen), torch.tensor([1.0, 2.0, 0.5])
    for c in (grp, one):
        c.write_slot(0, b, h, ks, vs, lw)
    _same_reads(grp, one)
    keep = torch.rand(grp.get(0)[0].shape[:3], generator=gen) < 0.5
    for c in (grp, one):
        c.evict(0, keep)
    _same_reads(grp, one)
    _same_attention(grp, one, gen, H * G, D)
    for c in (grp, one):
        c.shrink(0)
    _same_reads(grp, one)
    _same_attention(grp, one, gen, H * G, D)
    # the Triton kernel (interpreted on the CPU) per group gives the reference's answer
    q = torch.randn(B, H * G, D, generator=gen)
    torch.testing.assert_close(grp.attend(0, q), one.attend(0, q, backend="reference"), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="q"):
        grp.attend(0, torch.randn(B, 3, D))
    with pytest.raises(ValueError, match="pattern.kv_len"):
        grp.attend(0, q, TokenPattern.from_lists([[[0]] * H] * B, T + 100))
    with pytest.raises(ValueError, match="keep"):
        grp.evict(0, torch.ones(B, H, 3, dtype=torch.bool))
    # ZipVL needs equal lengths (its own check); load_layer replaces the groups by one tensor
    with pytest.raises(ValueError, match="lengths"):
        ZipVLPolicy().apply(grp, 0, importance=torch.rand(B, H, 5))
    kk, vv = grp.get(0)
    grp.load_layer(0, kk, vv, grp.lengths(0), grp.positions(0), grp.seq_lens(0), grp.log_weights(0))
    assert grp.layers[0].groups is None
    torch.testing.assert_close(grp.attend(0, q, backend="reference"), one.attend(0, q, backend="reference"))


def test_razor_storage_follows_slots_in_use():
    """T = 8192: retrieval head 0 keeps all, heads 1-3 keep 4 sinks + 4000 + 1 compensation slot."""
    B, H, D, T = 1, 4, 64, 8192
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(B, H, T, D, generator=gen).half()
    v = torch.randn(B, H, T, D, generator=gen).half()
    full = KVCache(1, B, H, D, group_waste=1.0)
    grp = KVCache(1, B, H, D)
    pol = RazorAttentionPolicy(retrieval_heads={0: [0]}, n_sink=4, compression=5.0, min_window=4000)
    for c in (full, grp):
        c.append(0, k, v)
        pol.apply(c, 0)
    assert grp.lengths(0).tolist() == [[T, 4005, 4005, 4005]]
    used = grp.used_bytes(0)
    assert full.nbytes(0) > 1.3 * used  # one tensor: every head padded to T
    slots = T + 3 * 4005
    meta = slots * (8 + 4)  # positions int64 + log-weights float32 per slot
    assert used <= grp.nbytes(0) <= used + meta + 256  # storage = slots in use (+ metadata)
    assert grp.nbytes(0) < 1.05 * used  # K+V 256 bytes a slot, metadata 12
    # StreamingLLM: equal lengths, no groups
    s = KVCache(1, B, H, D)
    s.append(0, k, v)
    StreamingLLMPolicy(n_sink=4, window=100).apply(s, 0)
    assert s.layers[0].groups is None and s.get(0)[0].shape[2] == 104
