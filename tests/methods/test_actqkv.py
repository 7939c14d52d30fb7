
import pytest
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.kernels.sparse_decode import sparse_decode_attention
from sparsattn.methods import get_method, list_methods
from sparsattn.methods.actqkv import activation_bias, probe_query
from sparsattn.methods.base import SelectContext

from _sparse_decode_utils import assert_equals_dense

SMALL = dict(n_init=4, n_local=16, block_size=8)


def small(blocks=3, **kw):
    return get_method("actqkv", token_budget=4 + 16 + blocks * 8, **{**SMALL, **kw})


def test_registered_as_decode_method():
    assert "actqkv" in list_methods("decode")
    m = get_method("actqkv")
    assert m.avg_blocks == 46 and m.block_bounds == (32, 92)  # the authors' 2K configuration


# -- activation bias and probe query -------------------------------------------------------------


def test_anchor_token_dominates_probe_query():
    # W-1 identical tokens and one anchor differing in every channel by the same amount: per channel
    # mu = a/W, var = a^2 (W-1)/W^2, so the anchor's bias is (W-1)/1.01 and each other token's is
    # 1/(1.01 (W-1)); normalised, the anchor's weight is (W-1)/W.
    W, C = 5, 12
    base = torch.randn(C)
    win = base.repeat(W, 1)
    win[2] += 3.0
    ab = activation_bias(win)
    assert torch.allclose(ab[2], torch.tensor((W - 1) / 1.01))
    assert torch.allclose(ab[[0, 1, 3, 4]], torch.full((4,), 1 / (1.01 * (W - 1))))
    p, w = probe_query(win)
    assert torch.allclose(w[2], torch.tensor((W - 1) / W)) and torch.allclose(w.sum(), torch.tensor(1.0))
    assert torch.allclose(p, (w[:, None] * win).sum(0))

    # a noisy window: the anchor still takes most of the weight and the probe leans towards it far
    # more than mean pooling does
    g = torch.Generator().manual_seed(0)
    y, x = torch.randn(C, generator=g), torch.randn(C, generator=g)
    win = y + 0.05 * torch.randn(W, C, generator=g)
    win[3] = x
    p, w = probe_query(win)
    assert int(w.argmax()) == 3 and float(w[3]) > 0.6
    cos = torch.nn.functional.cosine_similarity
    assert cos(p, x, dim=0) > cos(win.mean(0), x, dim=0) + 0.2
    # batched leading dims; one token or identical tokens: zero bias, uniform weights (mean pooling)
    pb, wb = probe_query(torch.stack([win, win.flip(0)]))
    assert torch.allclose(pb[0], p) and int(wb[1].argmax()) == W - 1 - 3
    for degenerate in (win[:1], y.repeat(4, 1)):
        p1, w1 = probe_query(degenerate)
        assert torch.isfinite(p1).all() and torch.allclose(w1, torch.full_like(w1, 1 / w1.shape[-1]))
        assert torch.allclose(p1, degenerate.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="window"):
        activation_bias(torch.randn(5))


def _two_topic_cache(T=120, D=16, Hkv=2, seed=0):
    """Keys: noise, block 3 (tokens 28..35) along x, block 6 (tokens 52..59) along y."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(D, generator=g), torch.randn(D, generator=g)
    k = 0.3 * torch.randn(1, Hkv, T, D, generator=g)
    k[:, :, 4 + 3 * 8:4 + 4 * 8] = x
    k[:, :, 4 + 6 * 8:4 + 7 * 8] = y
    return k, x, y


@pytest.mark.parametrize("granularity", ["shared", "kv_head"])
def test_probe_window_anchor_steers_block_retrieval(granularity):
    k, x, y = _two_topic_cache()
    Hq = 4
    # the layer's last 4 queries: the topic y three times and one anchor along x; the current query is y
    window = [y, x, y, y]
    picked = {}
    for W in (1, 4):
        m = small(blocks=1, probe_window=W, head_granularity=granularity)
        ctx = SelectContext(layer=0)
        for qv in window:
            p = m.select(qv.repeat(1, Hq, 1), k, ctx)
        tm = p.to_token_mask()[0]
        assert p.heads == (1 if granularity == "shared" else 2)
        picked[W] = (bool(tm[:, 28:36].all()), bool(tm[:, 52:60].all()))
        assert int(ctx.state["actqkv"]["alloc"][0]) == 1
    assert picked[1] == (False, True)  # the current query alone retrieves the y block
    assert picked[4] == (True, False)  # the anchor dominates the activation-aware probe


# -- dynamic cut-off -------------------------------------------------------------------------------


def _layer_keys(T, D, Hkv, u, peaked, g):
    noise = torch.randn(2, Hkv, T, D, generator=g)
    if not peaked:
        return noise
    sign = torch.where(torch.rand(T, generator=g) < 0.1, 1.0, -1.0)
    return 0.05 * noise + u * sign[None, None, :, None]


def test_cutoff_respects_total_budget_across_layers():
    """Layers with peaked block scores (low information density) give blocks to layers with flat
    scores; a sequence never reads more than n_layers x avg retrieved blocks per step."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D = 2, 4, 2, 400, 16
    m = get_method("actqkv", token_budget=4 + 16 + 20 * 4, n_init=4, n_local=16, block_size=4, history=2,
                   temperature=0.1)
    avg, (lo, hi) = m.avg_blocks, m.block_bounds
    assert (avg, lo, hi) == (20, 14, 40)
    u = torch.randn(D, generator=g)
    peaked = [True, False, True, False, True]
    ks = [_layer_keys(T, D, Hkv, u, pk, g) for pk in peaked]
    kl = torch.tensor([400, 330])
    nb = ((kl - 20) // 4).tolist()
    state = {}
    flat_more = 0
    for step in range(6):
        q = u + 0.1 * torch.randn(B, Hq, D, generator=g)
        pats = [m.select(q, ks[l], SelectContext(layer=l, state=state,
                                                 extras={"kv_lens": kl, "padding_side": "left"}))
                for l in range(5)]
        alloc = torch.stack([state["actqkv"]["alloc"][l] for l in range(5)])  # [layers, B]
        assert (alloc.sum(0) <= 5 * avg).all()
        for l, p in enumerate(pats):  # the pattern reads sinks + local window + exactly the allocated blocks
            local = 16 + (kl - 20) % 4
            assert torch.equal(p.counts[:, 0].long(), 4 + local + alloc[l] * 4)
            assert bool((p.indices[1, 0, :p.counts[1, 0]] >= 70).all())  # row 1 is left-padded by 70
        if step < 2:  # warm-up (history 2): uniform shares
            assert (alloc == avg).all()
        else:
            assert ((alloc >= lo) & (alloc <= hi)).all()
            assert (alloc.sum(0) >= 5 * avg - 2).all()  # the pool is used (up to rounding)
            pk, fl = alloc[[0, 2, 4]].float().mean(0), alloc[[1, 3]].float().mean(0)
            flat_more += int((fl > pk + 2).all())
    assert flat_more == 4
    assert all(n >= 20 for n in nb)


def test_cutoff_never_overshoots_when_minimum_clamps_bind():
    """Flat layers first, peaked ones last, a wide clamp: the shares ask early layers for many
    blocks; the minimum kept for every later layer still caps the step's total."""
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, T, D = 1, 4, 2, 600, 16
    m = get_method("actqkv", token_budget=4 + 16 + 10 * 4, n_init=4, n_local=16, block_size=4, history=1,
                   temperature=0.02, min_frac=1.0, max_frac=4.0)
    avg, (lo, hi) = m.avg_blocks, m.block_bounds
    assert lo == avg == 10 and hi == 40
    u = torch.randn(D, generator=g)
    ks = [_layer_keys(T, D, Hkv, u, pk, g)[:1] for pk in (False, False, True, True, True, True)]
    state = {}
    for step in range(4):
        q = u + 0.1 * torch.randn(B, Hq, D, generator=g)
        for l in range(6):
            m.select(q, ks[l], SelectContext(layer=l, state=state))
        alloc = torch.stack([state["actqkv"]["alloc"][l] for l in range(6)])[:, 0]
        assert int(alloc.sum()) <= 6 * avg and int(alloc.min()) >= lo
        # with min_frac 1 every layer must keep avg: the only feasible split is the uniform one
        assert (alloc == avg).all()


# -- patterns, full budget, caching ------------------------------------------------------------------


def _random_case(B=2, Hq=8, Hkv=2, T=300, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("granularity", ["shared", "kv_head"])
def test_pattern_reads_sinks_window_and_blocks_and_matches_kernel(side, granularity):
    q, k, v = _random_case()
    kl = torch.tensor([300, 201])
    m = small(blocks=5, head_granularity=granularity)
    p = m.select(q, k, SelectContext(layer=0, extras={"kv_lens": kl, "padding_side": side}))
    p.validate()
    assert p.indices.dtype == torch.int32 and p.heads == (1 if granularity == "shared" else 2)
    tm = p.to_token_mask()
    for b, L in enumerate(kl.tolist()):
        lo = 300 - L if side == "left" else 0
        valid = torch.zeros(300, dtype=torch.bool)
        valid[lo:lo + L] = True
        assert not (tm[b] & ~valid).any()
        assert tm[b, :, lo:lo + 4].all() and tm[b, :, lo + L - 16:lo + L].all()  # sinks, local window
        nb = (L - 20) // 8
        blocks = tm[b, :, lo + 4:lo + 4 + nb * 8].reshape(tm.shape[1], nb, 8)
        assert (blocks.all(-1) | ~blocks.any(-1)).all()  # whole blocks only
        assert (blocks.all(-1).sum(-1) == 5).all()
        assert tm[b, :, lo + 4 + nb * 8:lo + L].all()  # the incomplete block joins the local window
    # the kernel computes exactly the selected keys
    out = sparse_decode_attention(q, k, v, p, backend="reference")
    G = 8 // 2
    for b in range(2):
        mask = tm[b].repeat_interleave(8 // p.heads, 0)  # [Hq, T]: each query head reads its KV head's list
        kr, vr = k[b].repeat_interleave(G, 0), v[b].repeat_interleave(G, 0)
        s = torch.einsum("hd,htd->ht", q[b].double(), kr.double()) / 4.0
        ref = torch.einsum("ht,htd->hd", s.masked_fill(~mask, float("-inf")).softmax(-1), vr.double())
        assert torch.allclose(out[b].double(), ref, atol=1e-5)


def test_full_budget_equals_dense():
    q, k, v = _random_case(T=257)
    kl = torch.tensor([257, 99])
    # warm dynamic cut-off with uneven layers (the shares give some layers fewer than avg = 29 blocks):
    # a row within the budget still reads every token
    g = torch.Generator().manual_seed(3)
    u = torch.randn(16, generator=g)
    ks = [_layer_keys(257, 16, 2, u, pk, g) for pk in (True, False, True)]
    m = get_method("actqkv", token_budget=257, history=1, temperature=0.05, **SMALL)
    state = {}
    for step in range(3):
        for layer in range(3):
            p = m.select(q, ks[layer], SelectContext(layer=layer, state=state, extras={"kv_lens": kl}))
            assert_equals_dense(q, ks[layer], v, p, kl)
    # left padding: the last kv_lens[b] tokens
    p = get_method("actqkv", token_budget=4096).select(q, k, SelectContext(extras={"kv_lens": kl, "padding_side": "left"}))
    out = sparse_decode_attention(q, k, v, p, backend="reference")
    for b, L in enumerate(kl.tolist()):
        ref, _ = dense_reference(q[b:b + 1, :, None], k[b:b + 1, :, 257 - L:], v[b:b + 1, :, 257 - L:])
        assert torch.allclose(out[b].double(), ref[0, :, 0], atol=1e-5)
    # one short row is dense, the long one is not
    p = small(blocks=10).select(q, k, SelectContext(extras={"kv_lens": kl}))
    assert int(p.counts[1, 0]) == 99 and int(p.counts[0, 0]) < 257


def test_block_means_are_cached_and_refreshed():
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, D = 2, 4, 2, 16
    k = torch.randn(B, Hkv, 200, D, generator=g)
    m = small(blocks=4)
    ctx = SelectContext(layer=0)
    for T in (60, 61, 68, 69, 90, 120):
        q = torch.randn(B, Hq, D, generator=g)
        kl = torch.tensor([T, T - 7])
        ctx.extras.update(kv_lens=kl, padding_side="left")
        p = m.select(q, k[:, :, :T], ctx)
        fresh = m.select(q, k[:, :, :T], SelectContext(layer=0, extras={"kv_lens": kl, "padding_side": "left"}))
        assert torch.equal(p.to_unit_mask(), fresh.to_unit_mask())
        blk = ctx.state["actqkv"]["layers"][0]["blocks"]
        nd = blk["means"].shape[2]
        assert nd == (T - 7 - 20) // 8
        lo = torch.tensor([0, 7])
        for b in range(B):
            s = int(lo[b]) + 4
            ref = k[b, :, s:s + nd * 8].reshape(Hkv, nd, 8, D).mean(2)
            assert torch.allclose(blk["means"][b], ref, atol=1e-6)
    # a cache whose content moved (a KV policy evicting the front) is detected, not read stale
    k2 = torch.roll(k[:, :, :120], shifts=-5, dims=2)
    q = torch.randn(B, Hq, D, generator=g)
    kl = torch.tensor([120, 113])
    ctx.extras.update(kv_lens=kl)
    p = m.select(q, k2, ctx)
    fresh = m.select(q, k2, SelectContext(layer=0, extras={"kv_lens": kl, "padding_side": "left"}))
    assert torch.equal(p.to_unit_mask(), fresh.to_unit_mask())


def test_bad_inputs_name_the_argument():
    for name in ("token_budget", "n_init", "n_local", "block_size", "probe_window", "history"):
        with pytest.raises(ValueError, match=name):
            get_method("actqkv", **{name: -7})
    with pytest.raises(ValueError, match="token_budget"):
        get_method("actqkv", token_budget=600)  # < 64 + 512 + 32
    for name, bad in (("min_frac", 0), ("max_frac", 0.5), ("temperature", 0.0), ("head_granularity", "query")):
        with pytest.raises(ValueError, match=name):
            get_method("actqkv", **{name: bad})
    q, k, _ = _random_case(T=100)
    with pytest.raises(ValueError, match="padding_side"):
        small().select(q, k, SelectContext(extras={"padding_side": "middle"}))
    with pytest.raises(ValueError, match="q"):
        small().select(q[:, :, None].expand(2, 8, 3, 16), k)


# -- through the HF integration -----------------------------------------------------------------


def test_hf_decode_reads_exactly_the_selected_keys(hf_util, decode_patterns):
    import sparsattn
    from sparsattn.integrations.hf import SparseCache

    pats = decode_patterns
    model = hf_util.make_model("llama")
    T, pads = 150, [0, 20]
    ids, am, pos = hf_util.left_padded(2, T, pads)
    nxt = torch.randint(0, 128, (2, 1))
    cache = SparseCache(config=model.config)
    ck = hf_util.cache_kwarg(model)
    sparsattn.patch(model, decode=small(blocks=3), backend="reference")
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, **{ck: cache})
            am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
            got = model(input_ids=nxt, attention_mask=am2, position_ids=pos[:, -1:] + 1, use_cache=True,
                        **{ck: cache}).logits[:, -1]
    finally:
        sparsattn.unpatch(model)
    assert len(pats) == 4
    full = torch.cat([ids, nxt], 1)
    pos2 = torch.cat([pos, pos[:, -1:] + 1], 1)
    masks = {}
    for l, p in enumerate(pats):
        keep = hf_util.causal_keep(T + 1, am2).expand(2, 1, T + 1, T + 1).clone()
        keep[:, 0, -1] = p.to_token_mask()[:, 0]
        assert (keep[:, 0, -1].sum(-1) < am2.sum(-1)).all()  # really sparse
        masks[l] = keep
    ref = hf_util.eager_logits(model, full, masks, pos2)[:, -1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)


def test_hf_generate_dynamic_budget_and_full_budget_is_dense(hf_util):
    import sparsattn
    from sparsattn.integrations.hf import SparseCache

    model = hf_util.make_model("llama", attn_implementation="sdpa")
    ids, am, _ = hf_util.left_padded(2, 150, [0, 20])
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        m = small(blocks=3, history=2, temperature=0.05)
        cache = SparseCache(config=model.config)
        with sparsattn.patched(model, decode=m, backend="reference"):
            out = model.generate(ids, **kw, **{hf_util.cache_kwarg(model): cache})
        with sparsattn.patched(model, decode="actqkv", backend="reference"):  # 2K budget > 156 tokens
            dense = model.generate(ids, **kw)
    assert out.shape == ref.shape and torch.equal(dense, ref)
    st = cache.state["actqkv"]
    assert st["order"] == [0, 1, 2, 3]
    alloc = torch.stack([st["alloc"][l] for l in range(4)])
    assert (alloc.sum(0) <= 4 * 3).all() and (alloc >= 1).all()
    assert all(st["layers"][l]["count"] == 5 for l in range(4))  # one sample per decode step
