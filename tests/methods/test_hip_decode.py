"""hip_decode: HiP's tree search at refresh steps, the mask reused in between, sinks + window always read."""
import warnings

import pytest
import torch

import sparsattn.methods.hip_decode as hd
from sparsattn.methods import get_method, list_methods
from sparsattn.methods.base import SelectContext
from sparsattn.methods.hip_decode import HiPDecode

from _sparse_decode_utils import assert_equals_dense, needle_case


def bump_case(B=2, Hkv=2, G=4, T=2048, D=64, pos=(700, 1300), strength=6.0, width=48.0, seed=0, heads=None):
    """Random K plus, per sequence, a key at ``pos[b]`` aligned with the group's queries whose alignment
    decays with the distance (``exp(-|t - pos| / width)``): a needle with the local structure of real
    attention that HiP's search relies on (a lone random-neighbourhood key is found only by chance)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, Hkv, 1, D, generator=gen)
    q = (u + 0.3 * torch.randn(B, Hkv, G, D, generator=gen)).reshape(B, Hkv * G, D)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    w = strength * torch.exp(-(torch.arange(T).float()[None, :] - torch.tensor(pos[:B]).float()[:, None]).abs() / width)
    hs = list(range(Hkv)) if heads is None else heads
    for h in hs:
        k[:, h] += w[:, :, None] * u[:, h]
    return q, k, v, list(pos[:B])


def mask_of(p):
    return p.to_token_mask()


def test_registered_as_decode_method():
    assert "hip_decode" in list_methods("decode")
    m = get_method("hip_decode")
    assert isinstance(m, HiPDecode) and m.phase == "decode"
    assert (m.mask_k, m.block_k, m.n_sink, m.window, m.refresh_interval) == (512, 2, 16, 256, 8)


@pytest.mark.parametrize("refresh_interval", [1, 3])
def test_full_budget_equals_dense(refresh_interval):
    q, k, v, _ = needle_case(T=300)
    m = get_method("hip_decode", mask_k=320, block_k=16, n_sink=4, window=8, refresh_interval=refresh_interval)
    ctx = SelectContext(layer=0)
    with pytest.warns(UserWarning, match="mask_k=320 exceeds the cache"):
        ctx.extras["kv_lens"] = torch.tensor([290, 200])
        assert_equals_dense(q, k, v, m.select(q, k, ctx), ctx.extras["kv_lens"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per state, not at every step
        for step in range(1, 5):
            kl = torch.tensor([290 + step, 200 + step])
            ctx.extras["kv_lens"] = kl
            p = m.select(q, k, ctx)
            assert p.counts.tolist() == [[290 + step] * 2, [200 + step] * 2]
            assert_equals_dense(q, k, v, p, kl)


def test_selection_holds_sinks_window_and_whole_blocks_within_budget():
    q, k, v, _ = needle_case(T=2048)
    n_sink, window, mask_k, bk = 8, 64, 128, 16
    m = get_method("hip_decode", mask_k=mask_k, block_k=bk, n_sink=n_sink, window=window)
    kl = torch.tensor([2000, 1501])
    sel = mask_of(m.select(q, k, SelectContext(layer=0, extras={"kv_lens": kl})))
    for b in range(2):
        L = int(kl[b])
        for h in range(2):
            row = sel[b, h]
            assert row[:n_sink].all() and row[L - window:L].all()
            assert not row[L:].any()
            mid = row[n_sink:L - window]
            n_mid = int(mid.sum())
            # the kept blocks: mask_k tokens in whole block_k-aligned blocks (the last one may touch the window)
            assert mask_k - bk <= n_mid <= mask_k, n_mid
            first = -(-n_sink // bk) * bk  # blocks past the one holding the sinks
            blocks = row[first:(L - window) // bk * bk].view(-1, bk)
            partial = blocks.any(1) & ~blocks.all(1)
            assert not partial.any()
            assert int(row.sum()) <= n_sink + window + mask_k


def test_refresh_exactly_every_n_steps_and_mask_reused_in_between(monkeypatch):
    calls = []
    real = hd.tree_search

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(hd, "tree_search", spy)
    q, k, v, _ = bump_case(T=1024, pos=(300, 500))
    N = 4
    m = get_method("hip_decode", mask_k=64, block_k=2, n_sink=4, window=16, refresh_interval=N)
    ctx = SelectContext(layer=5)
    kl0 = torch.tensor([900, 700])
    flags, ref = [], None
    g = torch.Generator().manual_seed(3)
    for step in range(10):
        kl = kl0 + step
        ctx.extras["kv_lens"] = kl
        qq = q if step % N == 0 else torch.randn(q.shape, generator=g)  # the query changes between refreshes
        sel = mask_of(m.select(qq, k, ctx))
        flags.append(ctx.extras["mask_refresh"])
        if flags[-1]:
            ref, kl_ref = sel, kl.clone()
            continue
        # reused: the refresh's selection plus every token appended since, nothing else
        want = ref.clone()
        t = torch.arange(k.shape[2])
        want |= ((t[None, :] >= kl_ref[:, None]) & (t[None, :] < kl[:, None]))[:, None, :]
        assert torch.equal(sel, want), step
    assert flags == [True, False, False, False, True, False, False, False, True, False]
    assert len(calls) == 3
    # another layer keeps its own schedule; a shorter cache (a new sequence) refreshes at once
    ctx2 = SelectContext(layer=6, state=ctx.state, extras={"kv_lens": kl0})
    m.select(q, k, ctx2)
    assert ctx2.extras["mask_refresh"]
    ctx.extras["kv_lens"] = kl0 - 100
    m.select(q, k, ctx)
    assert ctx.extras["mask_refresh"]


def test_planted_needle_block_is_found_and_kept_between_refreshes():
    found = 0
    for seed in range(4):
        q, k, v, pos = bump_case(seed=seed, pos=(700, 1300))
        m = get_method("hip_decode", mask_k=64, block_k=2, n_sink=4, window=64, refresh_interval=4)
        ctx = SelectContext(layer=0)
        for step in range(4):
            kl = torch.tensor([1900, 1900]) + step
            ctx.extras["kv_lens"] = kl
            p = m.select(q, k, ctx)
            sel = mask_of(p)
            assert (p.counts <= 4 + 64 + 64 + step).all()
            for b in range(2):
                assert int(kl[b]) - pos[b] > 64 + 500  # far from the window
                found += int(sel[b, :, pos[b]].all())
    assert found == 4 * 4 * 2
    # a KV head without the bump does not select it: one selection per KV head
    q, k, v, pos = bump_case(pos=(700, 1300), heads=[0])
    sel = mask_of(get_method("hip_decode", mask_k=64, block_k=2, n_sink=4, window=64).select(q, k))
    assert sel[0, 0, pos[0]] and sel[1, 0, pos[1]]
    assert not torch.equal(sel[:, 0], sel[:, 1])


def test_gqa_group_combined_by_max():
    """Only one query head of a group looks for the bump: the group max still finds it."""
    q, k, v, pos = bump_case(pos=(600, 900))
    G = 4
    g = torch.Generator().manual_seed(9)
    q2 = torch.randn(q.shape, generator=g) * 0.05
    q2[:, ::G] = q[:, ::G]  # head 0 of each group keeps its bump-aligned query
    sel = mask_of(get_method("hip_decode", mask_k=64, block_k=2, n_sink=4, window=64).select(q2, k))
    assert all(bool(sel[b, h, pos[b]]) for b in range(2) for h in range(2))


def test_search_overlaps_exact_top_blocks_on_smooth_keys():
    """On keys with local structure (random walk), HiP's blocks overlap the exact top blocks by max q·k."""
    B, Hkv, G, T, D, bk, K = 1, 2, 4, 2048, 16, 16, 8
    gen = torch.Generator().manual_seed(1)
    k = torch.cumsum(torch.randn(B, Hkv, T, D, generator=gen), 2) * 0.2
    q = torch.randn(B, Hkv * G, D, generator=gen)
    m = get_method("hip_decode", mask_k=K * bk, block_k=bk, n_sink=0, window=1)
    sel = mask_of(m.select(q, k))
    s = torch.einsum("bhgd,bhtd->bhgt", q.view(B, Hkv, G, D), k).amax(2)[..., : T - 1]  # search range
    hits = 0
    for h in range(Hkv):
        blk = torch.nn.functional.pad(s[0, h], (0, 1), value=float("-inf")).view(-1, bk).amax(1)
        true = set(torch.topk(blk, K).indices.tolist())
        got = set((sel[0, h, : T - 1].nonzero().flatten() // bk).tolist())
        hits += len(true & got)
    assert hits / (Hkv * K) >= 0.6, hits


def test_bad_inputs_name_the_argument():
    for kw, name in [({"mask_k": 0}, "mask_k"), ({"mask_k": -16}, "mask_k"), ({"mask_k": 24, "block_k": 16}, "mask_k"),
                     ({"block_k": 0}, "block_k"), ({"n_sink": -1}, "n_sink"), ({"window": 0}, "window"),
                     ({"refresh_interval": 0}, "refresh_interval"), ({"mask_k": 1.5}, "mask_k")]:
        with pytest.raises(ValueError, match=name):
            get_method("hip_decode", **kw)
    m = get_method("hip_decode", mask_k=32, block_k=2)
    q, k, v, _ = needle_case(T=100)
    with pytest.raises(ValueError, match="q"):
        m.select(q[:, :, None].expand(-1, -1, 2, -1), k)
    with pytest.raises(ValueError, match="k heads"):
        m.select(q[:, :3], k)
    with pytest.raises(ValueError, match="kv_lens"):
        m.select(q, k, SelectContext(extras={"kv_lens": torch.tensor([101, 50])}))


def test_short_cache_reads_everything_and_empty_search_range():
    q, k, v, _ = needle_case(T=40)
    m = get_method("hip_decode", mask_k=16, block_k=2, n_sink=4, window=64)  # sinks + window cover the cache
    kl = torch.tensor([40, 13])
    p = m.select(q, k, SelectContext(extras={"kv_lens": kl}))
    assert p.counts.tolist() == [[40, 40], [13, 13]]
    assert_equals_dense(q, k, v, p, kl)


# -- through the HF integration -----------------------------------------------------------------


def test_hf_full_budget_decode_step_equals_dense(hf_util):
    import sparsattn
    from sparsattn.integrations.hf import SparseCache

    model = hf_util.make_model("llama")
    ids, am, pos = hf_util.left_padded(2, 60, [0, 12])
    nxt = torch.randint(0, 128, (2, 1))
    ref = hf_util.decode_step_logits(model, ids, am, pos, nxt, SparseCache(config=model.config))
    cache = SparseCache(config=model.config)
    sparsattn.patch(model, decode=HiPDecode(mask_k=64, block_k=2, n_sink=2, window=4), backend="reference")
    try:
        with pytest.warns(UserWarning, match="exceeds the cache"):
            got = hf_util.decode_step_logits(model, ids, am, pos, nxt, cache)
    finally:
        sparsattn.unpatch(model)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)
    assert sorted(k for k in cache.state["hip_decode"] if k != "_warned") == [0, 1, 2, 3]


def test_hf_sparse_decode_reads_exactly_the_selection_and_refreshes(hf_util, decode_patterns, monkeypatch):
    import sparsattn
    from sparsattn.integrations.hf import SparseCache

    pats = decode_patterns
    model = hf_util.make_model("llama")
    T, pads = 120, [0, 20]
    ids, am, pos = hf_util.left_padded(2, T, pads)
    nxt = torch.randint(0, 128, (2, 1))
    cache = SparseCache(config=model.config)
    sparsattn.patch(model, decode=HiPDecode(mask_k=16, block_k=4, n_sink=2, window=8, refresh_interval=2),
                    backend="reference")
    try:
        got = hf_util.decode_step_logits(model, ids, am, pos, nxt, cache)
    finally:
        sparsattn.unpatch(model)
    assert len(pats) == 4
    am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
    full = torch.cat([ids, nxt], 1)
    pos2 = torch.cat([pos, pos[:, -1:] + 1], 1)
    masks = {}
    for l, p in enumerate(pats):
        assert (p.counts <= 2 + 8 + 16).all()
        assert p.heads == 2  # one selection per KV head, shared by its 2 query heads
        keep = hf_util.causal_keep(T + 1, am2).expand(2, 4, T + 1, T + 1).clone()
        keep[:, :, -1] = p.to_token_mask().repeat_interleave(2, 1)
        assert (keep[:, :, -1].sum(-1) < am2.sum(-1)[:, None]).all()  # really sparse
        masks[l] = keep
    ref = hf_util.eager_logits(model, full, masks, pos2)[:, -1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)
    # generation: refresh at decode steps 0, 2, 4 (interval 2) in every layer
    model2 = hf_util.make_model("llama", attn_implementation="sdpa")
    cache = SparseCache(config=model2.config)
    seen = []
    orig = HiPDecode.select

    def rec(self, q, k, ctx=None):
        out = orig(self, q, k, ctx)
        if ctx.layer == 0:
            seen.append(ctx.extras["mask_refresh"])
        return out

    monkeypatch.setattr(HiPDecode, "select", rec)
    with torch.no_grad(), sparsattn.patched(model2, decode=HiPDecode(mask_k=16, block_k=4, n_sink=2, window=8,
                                                                      refresh_interval=2), backend="reference"):
        out = model2.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              **{hf_util.cache_kwarg(model2): cache})
    assert out.shape == (2, T + 6)
    assert seen == [True, False, True, False, True]  # 5 decode steps after the prefill's token
