import warnings

import pytest
import torch

from sparsattn.methods import get_method, list_methods
from sparsattn.methods.base import SelectContext
from sparsattn.methods.longheads import mean_chunk_keys

from _sparse_decode_utils import assert_equals_dense, needle_case, selects


def _chunk_mask(p, n_chunks=None):
    m = p.to_unit_mask()
    return m if n_chunks is None else m[..., :n_chunks]


def test_registered_as_decode():
    assert "longheads_decode" in list_methods("decode")


def test_full_budget_equals_dense():
    q, k, v, _ = needle_case(T=333)
    kl = torch.tensor([333, 200])
    m = get_method("longheads_decode", window_size=16, atten_length=512)
    with pytest.warns(UserWarning, match="atten_length"):
        p = m.select(q, k, SelectContext(layer=0, extras={"kv_lens": kl}))
    assert p.page_size == 16 and p.heads == 2
    assert p.counts.tolist() == [[21, 21], [13, 13]]  # every chunk holding a valid token
    assert_equals_dense(q, k, v, p, kl)


def test_forced_chunks_whole_chunks_and_budget():
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, D, w = 2, 2, 4, 32, 16
    T = 320  # 20 chunks
    k = torch.randn(B, Hkv, T, D, generator=gen)
    m = get_method("longheads_decode", window_size=w, atten_length=6 * w)
    for L0, L1 in ((300, 161), (97, 96), (33, 17), (16, 1)):
        q = torch.randn(B, Hkv * G, D, generator=gen)
        kl = torch.tensor([L0, L1])
        p = m.select(q, k, SelectContext(layer=1, extras={"kv_lens": kl}))
        tok = p.to_token_mask()
        units = p.to_unit_mask()
        for b, L in enumerate((L0, L1)):
            cur = (L - 1) // w
            n_chunks = cur + 1
            for h in range(Hkv):
                sel = units[b, h].nonzero().flatten().tolist()
                assert 0 in sel and cur in sel and (cur < 1 or cur - 1 in sel)
                assert max(sel) == cur  # nothing past the newest token's chunk
                assert len(sel) == min(6, n_chunks)  # exactly the budget in chunks
                # whole chunks: every selected chunk is read completely (tokens up to L are valid)
                t = tok[b, h, :cur * w + w]
                assert torch.equal(t.view(-1, w).all(-1), t.view(-1, w).any(-1))
                assert tok[b, h].sum() == len(sel) * w


def test_incremental_representatives_equal_recomputed():
    gen = torch.Generator().manual_seed(1)
    B, H, D, T, w = 2, 2, 32, 160, 16
    k = torch.randn(B, H, T, D, generator=gen)
    m = get_method("longheads_decode", window_size=w, atten_length=4 * w)
    ctx = SelectContext(layer=2)
    for L in (37, 38, 47, 48, 49, 80, 81, 130, 160):
        q = torch.randn(B, 2 * H, D, generator=gen)
        kl = torch.tensor([L, max(L - 33, 1)])
        ctx.extras["kv_lens"] = kl
        p = m.select(q, k, ctx)
        st = ctx.state["longheads_decode"][2]
        fresh = m.select(q, k, SelectContext(layer=2, extras={"kv_lens": kl}))
        assert torch.equal(p.to_unit_mask(), fresh.to_unit_mask())
        ref = mean_chunk_keys(k, w)
        for b in range(B):
            n = int(kl[b]) // w
            assert torch.equal(st["n_done"], kl // w)
            torch.testing.assert_close(st["reps"][b, :, :n], ref[b, :, :n], rtol=0, atol=1e-6)
    # only the newly completed chunk is computed: stale garbage in an old slot survives a valid step
    st["reps"][:, :, 0] = 123.0
    ctx.extras["kv_lens"] = torch.tensor([160, 128])
    m.select(q, k, ctx)
    assert (ctx.state["longheads_decode"][2]["reps"][:, :, 0] == 123.0).all()
    # a changed cache (content at a probed slot, shorter lengths) is detected and recomputed
    k2 = k.clone()
    k2[:, :, 0] += 1.0
    m.select(q, k2, ctx)
    torch.testing.assert_close(ctx.state["longheads_decode"][2]["reps"][:, :, :8], mean_chunk_keys(k2, w)[:, :, :8])
    ctx.extras["kv_lens"] = torch.tensor([40, 40])
    m.select(q, k, ctx)
    assert torch.equal(ctx.state["longheads_decode"][2]["n_done"], torch.tensor([2, 2]))
    torch.testing.assert_close(ctx.state["longheads_decode"][2]["reps"][:, :, :2], mean_chunk_keys(k, w)[:, :, :2])


def test_planted_needle_chunk_is_selected():
    q, k, v, pos = needle_case()  # T = 2048, needles at 700 and 1300
    m = get_method("longheads_decode", window_size=32, atten_length=4 * 32)  # 4 of 64 chunks (6%)
    p = m.select(q, k, SelectContext(layer=3))
    assert p.counts.max() == 4
    assert all(selects(p, b, h, pos[b]) for b in range(2) for h in range(2))
    # and one chunk per query head with head_reduce="none"
    pn = get_method("longheads_decode", window_size=32, atten_length=128, head_reduce="none").select(q, k)
    assert pn.heads == 8 and all(selects(pn, b, h, pos[b]) for b in range(2) for h in range(8))
    # without the needle the needle's chunk is not forced in (the selection is content-based)
    k0 = k.clone()
    for b in range(2):
        k0[b, :, pos[b]] = 0
    p0 = m.select(q, k0, SelectContext(layer=3))
    assert not all(selects(p0, b, h, pos[b]) for b in range(2) for h in range(2))


def test_refresh_interval_reuses_the_ranking():
    gen = torch.Generator().manual_seed(7)
    B, Hkv, G, D, w, T = 1, 1, 2, 32, 16, 400
    k = torch.randn(B, Hkv, T, D, generator=gen) * 0.1
    a, b = 5, 12  # two needle chunks, each matching its own query direction
    ua, ub = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    k[0, 0, a * w:(a + 1) * w] += 3 * ua
    k[0, 0, b * w:(b + 1) * w] += 3 * ub
    qa, qb = ua.expand(B, Hkv * G, D).clone(), ub.expand(B, Hkv * G, D).clone()

    def run(interval):
        m = get_method("longheads_decode", window_size=w, atten_length=4 * w, refresh_interval=interval)
        ctx = SelectContext(layer=0)
        picks = []
        for step in range(7):
            ctx.extras["kv_lens"] = torch.tensor([300 + step])
            units = m.select(qa if step == 0 else qb, k, ctx).to_unit_mask()[0, 0]
            picks.append((bool(units[a]), bool(units[b])))
            assert int(units.sum()) == 4
        return picks

    assert run(1) == [(True, False)] + [(False, True)] * 6
    assert run(3) == [(True, False)] * 3 + [(False, True)] * 4  # refreshes at steps 0, 3, 6
    assert run(100) == [(True, False)] * 7
    # the forced chunks follow the sequence between refreshes
    m = get_method("longheads_decode", window_size=w, atten_length=4 * w, refresh_interval=100)
    ctx = SelectContext(layer=0, extras={"kv_lens": torch.tensor([300])})
    m.select(qa, k, ctx)
    ctx.extras["kv_lens"] = torch.tensor([330])
    units = m.select(qa, k, ctx).to_unit_mask()[0, 0]
    assert units.nonzero().flatten().tolist() == [0, a, 19, 20]


def test_bad_inputs_raise():
    for name, bad in (("window_size", 0), ("atten_length", 0), ("atten_length", -16), ("refresh_interval", 0),
                      ("head_reduce", "min"), ("window_size", 1.5)):
        with pytest.raises(ValueError, match=name):
            get_method("longheads_decode", **{name: bad})
    with pytest.raises(ValueError, match="atten_length"):
        get_method("longheads_decode", window_size=64, atten_length=128)  # < 3 chunks
    m = get_method("longheads_decode", window_size=16, atten_length=64)
    q, k, _, _ = needle_case(T=128)
    with pytest.raises(ValueError, match="kv_lens"):
        m.select(q, k, SelectContext(extras={"kv_lens": torch.tensor([129, 5])}))
    with pytest.raises(ValueError, match="^q"):
        m.select(q[:, :, None].expand(2, 8, 3, 64), k)
    with pytest.raises(ValueError, match="k heads"):
        m.select(q, k[:, :1].expand(2, 3, 128, 64))
    # a budget beyond the cache warns once per generation state, not every step
    ctx = SelectContext(layer=0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for L in (40, 41):
            ctx.extras["kv_lens"] = torch.tensor([L, L])
            m.select(q, k, ctx)
    assert len([r for r in rec if "atten_length" in str(r.message)]) == 1


# -- through the HF integration -----------------------------------------------------------------


def _step(hf_util, model, ids, am, pos, nxt, method):
    import sparsattn
    from sparsattn.integrations.hf import SparseCache

    cache = SparseCache(config=model.config)
    if method is None:
        return hf_util.decode_step_logits(model, ids, am, pos, nxt, cache)
    with sparsattn.patched(model, decode=method, backend="reference"):
        return hf_util.decode_step_logits(model, ids, am, pos, nxt, cache)


def test_hf_full_budget_step_equals_dense_and_small_budget_reads_selection(hf_util, decode_patterns):
    from sparsattn.methods.longheads_decode import LongHeadsDecode

    model = hf_util.make_model("llama")
    T, pads = 120, [0, 17, 5]
    ids, am, pos = hf_util.left_padded(3, T, pads)
    nxt = torch.randint(0, 128, (3, 1), generator=torch.Generator().manual_seed(2))
    ref = _step(hf_util, model, ids, am, pos, nxt, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _step(hf_util, model, ids, am, pos, nxt, LongHeadsDecode(window_size=8, atten_length=256))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)

    pats = decode_patterns
    pats.clear()  # count the small-budget step only
    small = _step(hf_util, model, ids, am, pos, nxt, LongHeadsDecode(window_size=8, atten_length=32))
    assert len(pats) == 4
    am2 = torch.cat([am, torch.ones(3, 1, dtype=am.dtype)], 1)
    full = torch.cat([ids, nxt], 1)
    pos2 = torch.cat([pos, pos[:, -1:] + 1], 1)
    masks = {}
    for l, p in enumerate(pats):
        keep = hf_util.causal_keep(T + 1, am2).expand(3, 2, T + 1, T + 1).clone()
        sel = p.to_token_mask()  # [3, 2 kv heads, T + 1] in cache slots
        assert (sel.sum(-1) <= 32).all() and (sel.sum(-1) < am2.sum(-1)[:, None]).all()
        assert sel[:, :, -1].all()  # the newest token (current chunk) is always read
        for b, pad in enumerate(pads):
            assert sel[b, :, pad].all()  # the first real token (first chunk) is always read
        keep[:, :, -1] = sel
        masks[l] = keep.repeat_interleave(2, 1)  # query heads of each KV group
    eref = hf_util.eager_logits(model, full, masks, pos2)[:, -1]
    torch.testing.assert_close(small, eref, rtol=1e-4, atol=2e-5)
    assert (small - ref).abs().max() > 1e-4


def test_hf_generate_full_budget_with_refresh_equals_dense(hf_util):
    import sparsattn
    from sparsattn.integrations.hf import SparseCache
    from sparsattn.methods.longheads_decode import LongHeadsDecode

    model = hf_util.make_model("llama", attn_implementation="sdpa")
    ids, am, _ = hf_util.left_padded(2, 60, [0, 9])
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with sparsattn.patched(model, decode=LongHeadsDecode(window_size=8, atten_length=128, refresh_interval=4),
                                   backend="reference"):
                out = model.generate(ids, **kw, **{hf_util.cache_kwarg(model): SparseCache(config=model.config)})
    assert torch.equal(out, ref)
