"""HeadGroupStore attention with Gemma 2's logit soft-capping and gpt-oss's sink logits (issue 16.2):
``attend_causal`` (one query: the decode kernel; several: the float32 masked softmax), ``attend`` with a
slot pattern and ``attend_rows`` on left-padded rows, against a float64 loop over the rows, with per-head
lengths, merged-slot log-weights and several head groups."""
import math

import pytest
import torch

from sparsattn.kv.store import HeadGroupStore
from sparsattn.kv.store_attend import attend_rows
from sparsattn.patterns import TokenPattern

B, H, G, D = 2, 4, 2, 16
CAP = 1.5
SCALE = 0.6


def _store(gen, groups: bool, Tq: int) -> HeadGroupStore:
    """Rows of different lengths per head and sequence, two merged slots, ``Tq`` fresh tokens last."""
    st = HeadGroupStore(B, H, D, dtype=torch.float32)
    st.append(torch.randn(B, H, 31, D, generator=gen), torch.randn(B, H, 31, D, generator=gen),
              torch.tensor([31, 23]), torch.zeros(B, dtype=torch.long))
    keep = torch.ones(B, H, st.slots(), dtype=torch.bool)
    keep[:, 1:, 3:20] = False  # heads 1-3 lose their middle
    keep[1, 3, 1:] = False  # one row keeps a single token
    st.evict(keep)
    st.write_slot(torch.tensor([0, 1]), torch.tensor([2, 1]), torch.randn(2, D, generator=gen),
                  torch.randn(2, D, generator=gen), torch.tensor([math.log(6.0), math.log(3.0)]))
    st.append(torch.randn(B, H, Tq, D, generator=gen), torch.randn(B, H, Tq, D, generator=gen),
              torch.full((B,), Tq), torch.tensor([31, 23]))
    st.regroup(0.1 if groups else 1.0)
    assert (len(st.groups) > 1) == groups
    return st


def _rows(st: HeadGroupStore):
    """Per (b, kv head): (keys [n, D], values [n, D], log-weights [n]) in float64."""
    k, v, lw = st.padded("k"), st.padded("v"), st.padded("log_weight")
    out = []
    for b in range(B):
        out.append([])
        for h in range(H):
            n = int(st.lengths[b, h])
            w = torch.zeros(n, dtype=torch.float64) if lw is None else lw[b, h, :n].double()
            out[b].append((k[b, h, :n].double(), v[b, h, :n].double(), w))
    return out


def _loop(q, rows, softcap, sinks, pick=None):
    """float64: query i of (b, hq) reads the first ``n - Tq + i + 1`` slots of its row (or the slots
    ``pick(b, h)``); score = cap(q.k * scale) + log-weight; the sink joins the denominator."""
    Bq, Hq, Tq, _ = q.shape
    out = torch.zeros(Bq, Hq, Tq, D, dtype=torch.float64)
    for b in range(Bq):
        for hq in range(Hq):
            ks, vs, w = rows[b][hq // G]
            for i in range(Tq):
                sel = torch.arange(len(w) - Tq + i + 1) if pick is None else pick(b, hq // G)
                s = ks[sel] @ q[b, hq, i].double() * SCALE
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                s = s + w[sel]
                if sinks is not None:
                    s = torch.cat([s, sinks[hq].double().reshape(1)])
                p = torch.softmax(s, 0)[:len(sel)]
                out[b, hq, i] = p @ vs[sel]
    return out


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("Tq", [1, 3])
def test_attend_causal_with_softcap_and_sinks_equals_a_float64_loop(groups, Tq):
    gen = torch.Generator().manual_seed(11 + Tq + 2 * groups)
    st = _store(gen, groups, Tq)
    q = 3 * torch.randn(B, H * G, Tq, D, generator=gen)  # scores of a few units: the cap matters
    sinks = torch.randn(H * G, generator=gen) * 2 + 1
    rows = _rows(st)
    for cap, sk in ((CAP, None), (None, sinks), (CAP, sinks)):
        got = st.attend_causal(q, scale=SCALE, backend="reference", softcap=cap, sinks=sk)
        want = _loop(q, rows, cap, sk)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        plain = _loop(q, rows, None, None)
        assert (want - plain).abs().max() > 1e-2  # the cap / the sinks change the result here


@pytest.mark.parametrize("groups", [False, True])
def test_attend_with_a_slot_pattern_and_softcap_sinks(groups):
    """One decode query on the selected slots (past a row's length: skipped) of every KV head."""
    gen = torch.Generator().manual_seed(5 + groups)
    st = _store(gen, groups, 1)
    T = st.slots()
    sel = torch.tensor([0, 2, 3, 5, 21, 22, 23])
    sel = sel[sel < T]
    idx = sel.to(torch.int32).expand(B, H, -1).contiguous()
    pat = TokenPattern(idx, torch.full((B, H), sel.numel(), dtype=torch.int32), T)
    q = 3 * torch.randn(B, H * G, D, generator=gen)
    sinks = torch.randn(H * G, generator=gen) * 2
    got = st.attend(q, pat, scale=SCALE, backend="reference", softcap=CAP, sinks=sinks)
    rows = _rows(st)
    want = _loop(q[:, :, None], rows, CAP, sinks, pick=lambda b, h: sel[sel < int(st.lengths[b, h])])[:, :, 0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Tq", [1, 4])
def test_attend_rows_left_padded_with_softcap_sinks(Tq):
    """SparseCache's plain layout: left-padded rows of per-head lengths with log-weights."""
    gen = torch.Generator().manual_seed(2 + Tq)
    st = _store(gen, True, Tq)
    T, n = st.slots(), st.lengths
    kl, vl, lw = (st.padded(name, left=True) for name in ("k", "v", "log_weight"))
    q = 3 * torch.randn(B, H * G, Tq, D, generator=gen)
    sinks = torch.randn(H * G, generator=gen) * 2
    got = attend_rows(q, kl, vl, n, lw, scale=SCALE, backend="reference", pad=T - n, softcap=CAP, sinks=sinks,
                      max_chunk_elems=B * H * G * T)  # one query row per chunk: the chunking is exercised
    torch.testing.assert_close(got.double(), _loop(q, _rows(st), CAP, sinks), rtol=1e-5, atol=1e-5)


def test_empty_rows_with_sinks_give_zeros_and_bad_sinks_are_refused():
    st = HeadGroupStore(1, 2, D, dtype=torch.float32, exact=True)
    st.append(torch.randn(1, 2, 3, D), torch.randn(1, 2, 3, D), torch.tensor([3]), torch.zeros(1, dtype=torch.long))
    st.evict(torch.tensor([[[True] * 3, [False] * 3]]))  # head 1 holds nothing
    sinks = torch.tensor([0.5, 1.0, -1.0, 2.0])
    q = torch.randn(1, 4, 1, D)
    one = st.attend_causal(q, softcap=CAP, sinks=sinks, backend="reference")
    assert torch.isfinite(one).all() and (one[0, 2:] == 0).all()  # head 1's query heads: nothing to read
    assert (one[0, :2] != 0).any()
    q2 = torch.randn(1, 4, 2, D)
    with pytest.raises(ValueError, match="sinks"):
        st.attend_causal(q2, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="softcap"):
        st.attend_causal(q2, softcap=-1.0)


def test_one_query_through_the_triton_decode_kernel():
    """The same decode step with the Triton kernel (the interpreter on a CPU), once per head group."""
    gen = torch.Generator().manual_seed(21)
    st = _store(gen, True, 1)
    q = 3 * torch.randn(B, H * G, 1, D, generator=gen)
    sinks = torch.randn(H * G, generator=gen) * 2
    got = st.attend_causal(q, scale=SCALE, backend="triton", softcap=CAP, sinks=sinks)
    torch.testing.assert_close(got.double(), _loop(q, _rows(st), CAP, sinks), rtol=1e-5, atol=1e-5)
