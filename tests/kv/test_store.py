"""HeadGroupStore, the one head-group K/V storage: random appends / evictions / merged slots / regroupings
against a row-by-row Python model, grouped causal attention against a per-row softmax, and both caches
(KVCache, SparseCache) holding their rows in it with no padded copy per policy call (issue 11)."""
import math

import pytest
import torch

from sparsattn.kv import KVCache, RazorAttentionPolicy, as_cache_policy
from sparsattn.kv.store import HeadGroupStore, left_to_slots, slots_to_left
from sparsattn.kv.store_attend import attend_rows


def _rows(st: HeadGroupStore):
    """The store as Python rows: per (b, h) a list of (position, log-weight, key, value)."""
    k, v, p = st.padded("k"), st.padded("v"), st.padded("positions")
    lw = st.padded("log_weight")
    out = []
    for b in range(st.batch):
        out.append([[(int(p[b, h, s]), 0.0 if lw is None else float(lw[b, h, s]), k[b, h, s], v[b, h, s])
                     for s in range(int(st.lengths[b, h]))] for h in range(st.kv_heads)])
    return out


def _check(st, model):
    got = _rows(st)
    for b in range(st.batch):
        for h in range(st.kv_heads):
            assert len(got[b][h]) == len(model[b][h])
            for (p1, w1, k1, v1), (p2, w2, k2, v2) in zip(got[b][h], model[b][h]):
                assert p1 == p2 and math.isclose(w1, w2, abs_tol=1e-6)
                assert torch.equal(k1, k2) and torch.equal(v1, v2)
    T = st.slots()
    for g in st.groups:  # slots past a row's length are clear (zeros, position -1)
        dead = torch.arange(g.cap) >= st.lengths[:, g.heads][..., None]
        assert (g.k[dead] == 0).all() and (g.positions[dead] == -1).all()
        assert g.cap <= T


@pytest.mark.parametrize("exact", [False, True])
def test_random_operations_match_a_row_model(exact):
    gen = torch.Generator().manual_seed(3 + exact)
    B, H, D = 3, 5, 7
    st = HeadGroupStore(B, H, D, dtype=torch.float32, exact=exact)
    model = [[[] for _ in range(H)] for _ in range(B)]
    seen = torch.zeros(B, dtype=torch.long)
    for step in range(14):
        op = ["append", "append", "evict", "slot", "regroup"][step % 5]
        if op == "append":
            t = int(torch.randint(1, 6, (1,), generator=gen))
            lens = torch.randint(0, t + 1, (B,), generator=gen)
            k, v = torch.randn(B, H, t, D, generator=gen), torch.randn(B, H, t, D, generator=gen)
            st.append(k, v, lens, seen)
            for b in range(B):
                for h in range(H):
                    model[b][h] += [(int(seen[b]) + j, 0.0, k[b, h, j], v[b, h, j]) for j in range(int(lens[b]))]
            seen += lens
        elif op == "evict":
            keep = torch.rand(B, H, st.slots(), generator=gen) < torch.rand(H, generator=gen)[None, :, None]
            st.evict(keep)
            model = [[[r for s, r in enumerate(model[b][h]) if keep[b, h, s]] for h in range(H)] for b in range(B)]
        elif op == "slot":
            b, h = torch.tensor([0, 2, 2]), torch.tensor([4, 0, 3])
            ks, vs, lw = torch.randn(3, D, generator=gen), torch.randn(3, D, generator=gen), torch.rand(3, generator=gen)
            st.write_slot(b, h, ks, vs, lw)
            for i in range(3):
                model[b[i]][h[i]].append((-1, float(lw[i]), ks[i], vs[i]))
        else:
            st.regroup(0.1)
            longest = st.lengths.amax(0)
            for g in st.groups:
                assert g.cap == int(longest[g.heads].max())
        _check(st, model)
    assert len(st.groups) > 1  # the random lengths really split the heads


def _naive_causal(q, rows, G, scale):
    """Per (b, query head): softmax over the row's slots up to the query's own slot, with log-weights."""
    B, Hq, Tq, D = q.shape
    out = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            r = rows[b][hq // G]
            n = len(r)
            for i in range(Tq):
                m = n - Tq + i + 1
                ks = torch.stack([x[2] for x in r[:m]]).double()
                vs = torch.stack([x[3] for x in r[:m]]).double()
                w = torch.tensor([x[1] for x in r[:m]], dtype=torch.float64)
                a = torch.softmax(ks @ q[b, hq, i].double() * scale + w, 0)
                out[b, hq, i] = a @ vs
    return out


@pytest.mark.parametrize("Tq", [1, 3])
def test_grouped_causal_attention_equals_per_row_softmax(Tq):
    gen = torch.Generator().manual_seed(7)
    B, H, G, D = 2, 4, 2, 16
    st = HeadGroupStore(B, H, D, dtype=torch.float32)
    st.append(torch.randn(B, H, 37, D, generator=gen), torch.randn(B, H, 37, D, generator=gen),
              torch.tensor([37, 29]), torch.zeros(B, dtype=torch.long))
    keep = torch.ones(B, H, st.slots(), dtype=torch.bool)
    keep[:, 1:, 3:25] = False  # heads 1-3 lose their middle: two groups
    st.evict(keep)
    st.write_slot(torch.tensor([0, 1]), torch.tensor([2, 1]), torch.randn(2, D, generator=gen),
                  torch.randn(2, D, generator=gen), torch.tensor([math.log(5.0), math.log(2.0)]))
    st.append(torch.randn(B, H, Tq, D, generator=gen), torch.randn(B, H, Tq, D, generator=gen),
              torch.full((B,), Tq), torch.tensor([37, 29]))
    st.regroup(0.1)
    assert [g.heads.tolist() for g in st.groups] == [[0], [1, 2, 3]]
    q = torch.randn(B, H * G, Tq, D, generator=gen)
    got = st.attend_causal(q, scale=0.25, backend="reference")
    want = _naive_causal(q, _rows(st), G, 0.25)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the same rows left-padded (SparseCache's plain layout) through the same function
    T = st.slots()
    n = st.lengths
    kl, vl = st.padded("k", left=True), st.padded("v", left=True)
    lw = st.padded("log_weight", left=True)
    out = torch.cat([attend_rows(q[:, h * G:(h + 1) * G], kl[:, h:h + 1], vl[:, h:h + 1], n[:, h:h + 1],
                                 lw[:, h:h + 1], scale=0.25, backend="reference", dense_dtype=torch.float32,
                                 pad=(T - n)[:, h:h + 1]) for h in range(H)], 1)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_row_alignment_helpers():
    x = torch.arange(2 * 2 * 5).view(2, 2, 5).float()
    n = torch.tensor([[5, 2], [0, 3]])
    back = slots_to_left(left_to_slots(x, n, fill=-1), n, 5, fill=-1)
    assert torch.equal(back, torch.where(torch.arange(5) >= 5 - n[..., None], x, torch.full_like(x, -1)))
    full = torch.full((2, 2), 5)
    assert slots_to_left(x, full, 5).data_ptr() == x.data_ptr()  # every row full: a view, no copy


def test_both_caches_hold_their_rows_in_the_store_and_policies_edit_it_in_place(monkeypatch):
    """KVCache layers and SparseCache grouped layers are HeadGroupStores; once a SparseCache layer is grouped,
    the policy runs on that store (the padded row conversion of the adapter is never called again)."""
    from sparsattn.integrations.hf import GroupedLayer, SparseCache
    import sparsattn.kv.adapter as adapter

    kvc = KVCache(1, 1, 2, 8)
    kvc.append(0, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    assert type(kvc.store(0)) is HeadGroupStore
    torch.manual_seed(0)
    B, H, D, T = 2, 4, 8, 40
    pads = torch.tensor([0, 6])
    am = (torch.arange(T)[None, :] >= pads[:, None]).long()
    pol = RazorAttentionPolicy(retrieval_heads={0: [0, 2]}, n_sink=2, compression=6.0, min_window=4)
    sc = SparseCache(policy=as_cache_policy(pol))
    sc.begin_forward(am)
    sc.update(torch.randn(B, H, T, D), torch.randn(B, H, T, D), 0)
    gl = sc.layers[0]
    assert isinstance(gl, GroupedLayer) and type(gl.store) is HeadGroupStore
    store = gl.store

    def refuse(*a, **k):
        raise AssertionError("a grouped layer was copied to padded rows for the policy")

    monkeypatch.setattr(adapter, "left_to_slots", refuse)
    for step in range(4):
        sc.begin_forward(None)
        keys, values = sc.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), 0)
        sc.attend(0, torch.randn(B, 2 * H, 1, D), keys, values, scale=0.3, backend="reference")
        assert sc.layers[0] is gl and gl.store is store  # the same store, edited in place
        assert sc.policy_reports[0]["merged_tokens"] > 0
    lens = sc.head_lens(0)
    assert lens[:, [0, 2]].tolist() == [[T + 4] * 2, [T - 6 + 4] * 2]  # retrieval heads keep every token
