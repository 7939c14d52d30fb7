"""Tests of sparsattn.eval.fidelity against a brute-force float64 computation."""
from __future__ import annotations

import math

import pytest
import torch

from sparsattn.eval.fidelity import FidelityReport, attention_fidelity


def brute(q, k, v, mask, *, causal=True, topk=10, threshold=5e-3):
    """Per query head, everything materialised in float64 with explicit loops for top-k."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kr = k.double().repeat_interleave(G, dim=1)
    vr = v.double().repeat_interleave(G, dim=1)
    s = q.double() @ kr.transpose(-1, -2) / math.sqrt(D)
    off = Tk - Tq
    if causal:
        allowed = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + off
    else:
        allowed = torch.ones(Tq, Tk, dtype=torch.bool)
    keep = mask.expand(B, Hq, Tq, Tk) & allowed
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    od = p @ vr
    ss = s.masked_fill(~keep, float("-inf"))
    ps = torch.softmax(ss, -1)
    ps = torch.where(keep.any(-1, keepdim=True), ps, torch.zeros_like(ps))
    osp = ps @ vr
    diff = osp - od
    recall = (p * keep).sum(-1).mean(dim=(0, 2))
    topr = torch.zeros(Hq, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(Tq):
                cand = allowed[i].nonzero().flatten()
                kk = min(topk, cand.numel())
                order = cand[torch.argsort(p[b, h, i, cand], descending=True)][:kk]
                topr[h] += keep[b, h, i, order].double().mean()
    topr /= B * Tq
    pairs = allowed.sum() * B
    return {
        "recall": recall,
        "topk_recall": topr,
        "rel_error": diff.pow(2).sum(dim=(0, 2, 3)).sqrt() / od.pow(2).sum(dim=(0, 2, 3)).sqrt(),
        "n_large_error": (diff.abs() > threshold).sum(dim=(0, 2, 3)),
        "density": keep.sum(dim=(0, 2, 3)).double() / pairs,
        "o_sparse": osp, "o_dense": od,
    }


def _qkv(B=2, Hq=4, Hkv=2, Tq=37, Tk=None, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    return q, k, v


def assert_close(got, want, *, atol=1e-6, rtol=1e-5, msg=""):
    """Like torch.testing.assert_close (whose first call imports for seconds), with dtype cast."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape, (msg, got.shape, want.shape)
    assert torch.allclose(got, want, atol=atol, rtol=rtol), (msg, (got - want).abs().max().item())


def _assert_matches(rep: FidelityReport, ref: dict, *, atol=2e-5):
    for name in ("recall", "topk_recall", "rel_error", "density"):
        got = getattr(rep, name).double()
        assert_close(got, ref[name], atol=atol, rtol=1e-4, msg=name)
    # counts of |diff| > threshold: fp32 vs fp64 may flip an element sitting on the threshold
    assert (rep.n_large_error - ref["n_large_error"]).abs().max() <= 2


def test_full_mask_is_exact():
    q, k, v = _qkv()
    T = q.shape[2]
    rep = attention_fidelity(q, k, v, torch.ones(T, T, dtype=torch.bool))
    assert torch.allclose(rep.recall, torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(rep.topk_recall, torch.ones(4, dtype=torch.float64))
    assert float(rep.rel_error.max()) < 1e-6
    assert int(rep.n_large_error.sum()) == 0
    assert torch.allclose(rep.density, torch.ones(4, dtype=torch.float64))
    s = rep.summary()
    assert s["recall"] == pytest.approx(1.0, abs=1e-6) and s["density"] == 1.0 and s["rel_error"] < 1e-6


def test_diagonal_mask_analytic():
    q, k, v = _qkv(B=1, Hq=2, Hkv=2, Tq=20, seed=1)
    T = 20
    rep = attention_fidelity(q, k, v, torch.eye(T, dtype=torch.bool), topk=3)
    ref = brute(q, k, v, torch.eye(T, dtype=torch.bool), topk=3)
    # analytic: each row keeps only itself -> O_sparse row i = v_i; density 2 / (T + 1)
    assert_close(ref["o_sparse"], v.double())
    assert torch.allclose(rep.density, torch.full((2,), 2 / (T + 1), dtype=torch.float64))
    # recall = mean over rows of the dense diagonal probability
    s = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    diag = torch.softmax(s, -1).diagonal(dim1=-2, dim2=-1)  # [1, 2, T]
    assert_close(rep.recall, diag.mean(-1)[0], atol=1e-6, rtol=1e-5)
    # row 0 has one causal key (itself): top-k recall 1 there; rows 1, 2 use min(k, i+1) keys
    assert float(rep.topk_recall.min()) >= 1 / (3 * T)
    _assert_matches(rep, ref)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (4, 1)])
def test_random_mask_matches_brute_force(causal, Hq, Hkv):
    q, k, v = _qkv(B=2, Hq=Hq, Hkv=Hkv, Tq=33, D=8, seed=2)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, Hq, 33, 33, generator=g) < 0.3
    rep = attention_fidelity(q, k, v, mask, causal=causal, topk=5)
    _assert_matches(rep, brute(q, k, v, mask, causal=causal, topk=5))


def test_decode_rows_bottom_right():
    """Tq < Tk: query i sits at key position Tk - Tq + i."""
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Tq=5, Tk=40, D=8, seed=3)
    mask = torch.rand(1, 1, 5, 40, generator=torch.Generator().manual_seed(0)) < 0.5
    rep = attention_fidelity(q, k, v, mask, topk=10)
    ref = brute(q, k, v, mask, topk=10)
    _assert_matches(rep, ref)
    # causal pairs = sum over the 5 rows of (35 + i + 1)
    kept = (mask[0, 0] & (torch.arange(40)[None, :] <= torch.arange(5)[:, None] + 35)).sum()
    assert rep.density[0].item() == pytest.approx(kept.item() / sum(36 + i for i in range(5)))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_equals_unchunked_and_mask_fn(chunk):
    q, k, v = _qkv(B=2, Hq=4, Hkv=2, Tq=50, D=8, seed=4)
    mask = torch.rand(2, 4, 50, 50, generator=torch.Generator().manual_seed(1)) < 0.4
    full = attention_fidelity(q, k, v, mask, chunk_size=10_000)
    part = attention_fidelity(q, k, v, mask, chunk_size=chunk)
    calls = []

    def mask_fn(q0, q1):
        calls.append((q0, q1))
        return mask[:, :, q0:q1]

    via_fn = attention_fidelity(q, k, v, mask_fn, chunk_size=chunk)
    assert calls[0] == (0, min(chunk, 50)) and calls[-1][1] == 50
    assert all(b - a <= chunk for a, b in calls)
    for rep in (part, via_fn):
        for name in ("recall", "topk_recall", "rel_error", "density"):
            assert_close(getattr(rep, name), getattr(full, name), atol=1e-6, rtol=1e-5)
        assert torch.equal(rep.n_large_error, full.n_large_error)


def test_gqa_equals_repeat_interleave():
    q, k, v = _qkv(B=1, Hq=6, Hkv=2, Tq=30, D=8, seed=6)
    mask = torch.rand(1, 6, 30, 30, generator=torch.Generator().manual_seed(2)) < 0.3
    gqa = attention_fidelity(q, k, v, mask)
    mha = attention_fidelity(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask)
    for name in ("recall", "topk_recall", "rel_error", "density", "n_large_error"):
        assert_close(getattr(gqa, name), getattr(mha, name))
    # a kv-head mask is shared by the query heads of each group
    kv_mask = mask[:, ::3]  # [1, 2, T, T]
    shared = attention_fidelity(q, k, v, kv_mask)
    expanded = attention_fidelity(q, k, v, kv_mask.repeat_interleave(3, 1))
    assert_close(shared.recall, expanded.recall)
    assert_close(shared.density, expanded.density)


def test_empty_rows_and_pattern_object():
    q, k, v = _qkv(B=1, Hq=2, Hkv=2, Tq=12, D=8, seed=7)
    mask = torch.ones(12, 12, dtype=torch.bool)
    mask[3] = False  # row 3 keeps nothing: zero output, zero recall

    class Pattern:
        def to_dense_mask(self):
            return mask[None, None]

    rep = attention_fidelity(q, k, v, Pattern())
    ref = brute(q, k, v, mask)
    assert torch.equal(ref["o_sparse"][0, :, 3], torch.zeros(2, 8, dtype=torch.float64))
    _assert_matches(rep, ref)
    assert float(rep.recall.max()) <= 11 / 12 + 1e-6


def test_bf16_inputs_are_computed_in_fp32():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Tq=16, D=8, seed=8, dtype=torch.bfloat16)
    mask = torch.tril(torch.ones(16, 16, dtype=torch.bool), diagonal=-2) | torch.eye(16, dtype=torch.bool)
    rep = attention_fidelity(q, k, v, mask)
    _assert_matches(rep, brute(q, k, v, mask))


def test_report_rows_and_summary():
    q, k, v = _qkv(B=1, Hq=3, Hkv=1, Tq=10, D=4, seed=9)
    mask = torch.rand(10, 10, generator=torch.Generator().manual_seed(3)) < 0.5
    rep = attention_fidelity(q, k, v, mask)
    rows = rep.to_rows(layer=5, method="demo")
    assert [r["head"] for r in rows] == [0, 1, 2]
    assert all(r["layer"] == 5 and r["method"] == "demo" for r in rows)
    assert rows[1]["recall"] == pytest.approx(float(rep.recall[1]))
    s = rep.summary()
    assert s["recall"] == pytest.approx(float(rep.recall.mean()))
    assert s["rel_error"] == pytest.approx(math.sqrt(float(rep.err_sq.sum()) / float(rep.ref_sq.sum())))
    assert s["n_elements"] == 1 * 3 * 10 * 4


def test_errors():
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Tq=8, D=4)
    ok = torch.ones(8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask"):
        attention_fidelity(q, k, v, ok.float())
    with pytest.raises(ValueError, match="mask"):
        attention_fidelity(q, k, v, torch.ones(3, 8, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        attention_fidelity(q, k, v, torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        attention_fidelity(q, k, v, lambda a, b: torch.ones(b - a + 1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        attention_fidelity(q, k, v, "dense")
    with pytest.raises(ValueError, match="kv heads"):
        attention_fidelity(q, k[:, :1].expand(1, 3, 8, 4), v[:, :1].expand(1, 3, 8, 4), ok)
    bad = q.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        attention_fidelity(bad, k, v, ok)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        attention_fidelity(torch.randn(1, 4, 9, 4), k, v, torch.ones(9, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="topk"):
        attention_fidelity(q, k, v, ok, topk=0)
    with pytest.raises(ValueError, match="q"):
        attention_fidelity(q[0], k, v, ok)


def test_pattern_from_patterns_module():
    """A BlockPattern (kv-head mask via to_dense_mask) gives the pattern's own density."""
    patterns = pytest.importorskip("sparsattn.patterns")
    if not hasattr(patterns, "sliding_window"):
        pytest.skip("sparsattn.patterns.sliding_window not available")
    pat = patterns.sliding_window(100, 16, block_q=16, block_k=16, batch=1, heads=2)
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Tq=100, D=8, seed=10)
    rep = attention_fidelity(q, k, v, pat)
    assert float(rep.density.mean()) == pytest.approx(float(pat.density), rel=1e-9)
    _assert_matches(rep, brute(q, k, v, pat.to_dense_mask().repeat_interleave(2, 1)))
