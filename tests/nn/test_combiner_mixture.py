"""Combiner-Mixture and its two components (axial_vertical, axial_horizontal): against the implied
T x T attention matrix built entry by entry in float64 from the paper's factorisation (outputs, lse
and gradients; odd T, T not a multiple of the segment), full support (every earlier key, rows sum to
1), exact at one segment and at segment 1, pair accounting, bad input, bf16 at T = 4096, layer."""
from __future__ import annotations

import math

import pytest
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.nn import get_layer
from sparsattn.nn.mixers.combiner import combiner_attention, combiner_direct_mask, combiner_pairs

from ._approx_checks import assert_lse_merges_with_extra_keys, bf16_long_finite, future_change, qkv
from .mixer_helpers import train_smoke

COMPONENTS = {"axial_vertical": ("vertical",), "axial_horizontal": ("horizontal",),
              "mixture": ("vertical", "horizontal")}


def _plan(i, T, L, causal, kind):
    """(direct set, list of regions) of query i: sets of key positions, from the paper's definitions."""
    r, c = divmod(i, L)
    keys = range(i + 1) if causal else range(T)
    earlier = (lambda rr: rr < r) if causal else (lambda rr: rr != r)
    direct = {j for j in keys if (j // L == r) or (j % L == c and earlier(j // L))}
    regions = []
    if kind == "vertical":
        for t in range(L):
            if t != c:
                regions.append({j for j in range(T) if j % L == t and earlier(j // L)})
    else:
        for rr in range(math.ceil(T / L)):
            if earlier(rr):
                regions.append({j for j in range(T) if j // L == rr and j % L != c})
    regions = [g for g in regions if g]
    cover = set(direct)
    for g in regions:  # a partition of the support: every key exactly once
        assert not (cover & g)
        cover |= g
    assert cover == set(keys)
    return direct, regions


def _implied(q, k, v, variant, causal, L):
    """Implied attention P [B, H, T, T] (mean over the mixture's components), out = P v and lse =
    log of the mean normaliser, one query and one entry at a time."""
    B, H, T, D = q.shape
    s = D ** -0.5
    P = torch.zeros(B, H, T, T, dtype=q.dtype)
    lse = torch.zeros(B, H, T, dtype=q.dtype)
    comps = COMPONENTS[variant]
    for b in range(B):
        for h in range(H):
            for i in range(T):
                Zs = []
                for kind in comps:
                    direct, regions = _plan(i, T, L, causal, kind)
                    idx, logit, local = [], [], []
                    for j in sorted(direct):
                        idx.append([j])
                        logit.append((q[b, h, i] * k[b, h, j]).sum() * s)
                        local.append(torch.ones(1, dtype=q.dtype))
                    for g in regions:
                        g = sorted(g)
                        kg, qg = k[b, h, g].amax(0), q[b, h, g].amax(0)
                        idx.append(g)
                        logit.append((q[b, h, i] * kg).sum() * s)
                        local.append(torch.softmax((k[b, h, g] * qg).sum(-1) * s, 0))
                    lg = torch.stack(logit)
                    w = torch.softmax(lg, 0)
                    Zs.append(torch.logsumexp(lg, 0))
                    for e, (js, loc) in enumerate(zip(idx, local)):
                        P = P.index_put((torch.tensor([b]), torch.tensor([h]), torch.tensor([i]), torch.tensor(js)),
                                        w[e] * loc / len(comps), accumulate=True)
                lse = lse.index_put((torch.tensor([b]), torch.tensor([h]), torch.tensor([i])),
                                    (torch.logsumexp(torch.stack(Zs), 0) - math.log(len(comps)))[None])
    return P, torch.matmul(P, v), lse


@pytest.mark.parametrize("variant", sorted(COMPONENTS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,L", [(17, 4), (23, 5)])
def test_matches_implied_matrix_float64_with_gradients(variant, causal, T, L):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, T=T, D=3, seed=T))
    out, lse = combiner_attention(q, k, v, variant=variant, causal=causal, segment=L)
    P, ref, lref = _implied(q, k, v, variant, causal, L)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, lref, atol=1e-12, rtol=1e-10)
    g = torch.Generator().manual_seed(1)
    go, gl = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    fast = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
    slow = torch.autograd.grad((ref * go).sum() + (lref * gl).sum(), (q, k, v))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    # the fast path's own implied matrix (values = one-hot rows) is the reference P: rows sum to 1 and
    # every earlier key (every key: non-causal) has positive weight, no later key any
    with torch.no_grad():
        eye = torch.eye(T, dtype=q.dtype).expand(1, 2, T, T)
        Pf, _ = combiner_attention(q, k, eye, variant=variant, causal=causal, segment=L)
    torch.testing.assert_close(Pf, P.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(Pf.sum(-1), torch.ones(1, 2, T, dtype=q.dtype), atol=1e-12, rtol=0)
    support = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    assert (Pf[..., support] > 0).all() and (Pf[..., ~support] == 0).all()
    direct = combiner_direct_mask(variant, T, L, causal=causal)
    for i in range(T):
        assert set(direct[i].nonzero()[:, 0].tolist()) == _plan(i, T, L, causal, "vertical")[0]


@pytest.mark.parametrize("causal", [True, False])
def test_mixture_is_the_mean_of_its_components(causal):
    q, k, v = qkv(B=2, H=1, T=31, D=4)
    o, l = combiner_attention(q, k, v, variant="mixture", causal=causal, segment=6)
    (ov, lv), (oh, lh) = (combiner_attention(q, k, v, variant=c, causal=causal, segment=6)
                          for c in ("axial_vertical", "axial_horizontal"))
    torch.testing.assert_close(o, (ov + oh) / 2, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(l, torch.logaddexp(lv, lh) - math.log(2), atol=1e-12, rtol=1e-10)
    assert (ov - oh).abs().max() > 1e-3  # two different factorisations, not one twice


@pytest.mark.parametrize("variant", sorted(COMPONENTS))
@pytest.mark.parametrize("causal", [True, False])
def test_exact_where_the_construction_degenerates(variant, causal):
    q, k, v = qkv(T=29, D=8)
    ref, lref = dense_reference(q, k, v, causal=causal)
    for segment in (29, 64, 1):  # one row (segment >= T) or one column (segment 1): all keys direct
        out, lse = combiner_attention(q, k, v, variant=variant, causal=causal, segment=segment)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse, lref, atol=1e-10, rtol=1e-10)
    assert_lse_merges_with_extra_keys(lambda q, k, v: combiner_attention(q, k, v, variant=variant, segment=1),
                                      q, k, v)


@pytest.mark.parametrize("variant", ["axial", "fixed", "axial_vertical", "axial_horizontal", "mixture"])
def test_pairs_accounting(variant):
    q, k, v = qkv(B=2, H=3, T=50, D=4, dtype=torch.float32)
    for segment in (None, 7, 50, 1):
        st: dict = {}
        combiner_attention(q, k, v, variant=variant, segment=segment, stats=st)
        assert st["pairs"] == 6 * combiner_pairs(variant, 50, segment)
    n, L = 8, 8  # T = 64: P = n L^2 + L n^2 per head; the mixture shares its direct part
    P = n * L * L + L * n * n
    want = {"axial": P, "fixed": n * L * L + n * L + n * L * n, "axial_vertical": 2 * P, "axial_horizontal": 2 * P,
            "mixture": 3 * P}
    assert combiner_pairs(variant, 64) == want[variant]
    layer = get_layer("combiner", 32, 2, variant=variant)
    assert layer.cost(4096)["density"] == combiner_pairs(variant, 4096) / (4096 * 4097 / 2) < 0.2


def test_direct_mask_of_the_segment_variants():
    i = torch.arange(23)
    own = (i[:, None] // 5 == i[None, :] // 5) & (i[None, :] <= i[:, None])
    for variant in ("axial", "fixed"):
        assert torch.equal(combiner_direct_mask(variant, 23, 5), own)
    assert combiner_direct_mask("mixture", 23, 23, causal=False).all()


def test_bad_variant_and_segment_name_the_argument():
    q, k, v = qkv(T=20, D=8)
    for bad in ("logsparse", "Mixture", None):
        with pytest.raises(ValueError, match="variant"):
            combiner_attention(q, k, v, variant=bad)
        with pytest.raises(ValueError, match="variant"):
            get_layer("combiner", 32, 2, variant=bad)
    with pytest.raises(ValueError, match="variant"):
        combiner_direct_mask("logsparse", 20)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="segment"):
            combiner_attention(q, k, v, variant="mixture", segment=bad)
        with pytest.raises(ValueError, match="segment"):
            get_layer("combiner", 32, 2, variant="mixture", segment=bad)


def test_bf16_long_sequence_no_nan_in_value_or_gradient():
    for variant in ("axial_vertical", "axial_horizontal", "mixture"):
        bf16_long_finite(lambda q, k, v: combiner_attention(q, k, v, variant=variant), T=4096, D=8, H=1)
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, 4093, 8, dtype=torch.bfloat16, scale=6.0, seed=3))
    out, lse = combiner_attention(q, k, v, variant="mixture", causal=False)  # 4093 = 64 * 64 - 3: padded
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    grads = torch.autograd.grad(out.float().sum() + lse.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_layer_mixture_is_causal_and_full_support():
    for variant in ("mixture", "axial_vertical", "axial_horizontal"):
        assert future_change(get_layer("combiner", 32, 2, variant=variant)) == 0.0
    x = torch.randn(1, 1, 50, 8, dtype=torch.float64, requires_grad=True)
    out, _ = combiner_attention(x, x, x, variant="mixture")
    g, = torch.autograd.grad(out[0, 0, 37].sum(), x)
    reach = g[0, 0].abs().sum(-1) > 0
    assert reach[:38].all() and not reach[38:].any()
    layer = get_layer("combiner", 32, 2, variant="mixture", causal=False, segment=5)
    y = layer(torch.randn(2, 23, 32))
    assert y.shape == (2, 23, 32) and torch.isfinite(y).all()
    assert layer.last_stats["pairs"] == 2 * 2 * combiner_pairs("mixture", 23, 5)
    first, last = train_smoke("combiner", variant="mixture", segment=5)
    assert last < 0.8 * first, (first, last)


def test_fidelity_grid_combiner_rows():
    from sparsattn.eval.approx_quality import fidelity_rows, method_grid

    grid = [g for g in method_grid(8) if g["method"].startswith("combiner-")]
    assert {g["method"] for g in grid} == {"combiner-" + v for v in ("axial", "fixed", "axial_vertical",
                                                                      "axial_horizontal", "mixture")}
    q, k, v = qkv(B=1, H=2, T=49, D=8, dtype=torch.float32)
    rows = fidelity_rows({0: (q, k[:, :1], v[:, :1])}, {}, grid, log=lambda m: None)  # GQA: k/v repeated
    for r, g in zip(rows, grid):
        variant = g["method"][len("combiner-"):]
        seg = {"segment=sqrt(T)": 7, "segment=0.5*sqrt(T)": 4, "segment=2*sqrt(T)": 14}[r["config"]]
        assert r["pairs_per_query"] == combiner_pairs(variant, 49, seg) / 49
        assert 0 < r["rel_err"] < math.inf and 0 < r["recall"] < 1
