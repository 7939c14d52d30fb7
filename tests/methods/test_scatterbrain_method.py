"""The ``scatterbrain`` prefill method (Scatterbrain, arXiv 2110.15343): a method that computes attention
itself (``Method.attend``) through the ``scatterbrain`` mixer's core. Exact attention when the sparse
support covers every causal pair; in float64 equal to the mixer layer's own output and to the paper's
estimator written out pair by pair; causal; clear errors; patched into a tiny Llama."""
from __future__ import annotations

import math

import pytest
import torch

import sparsattn
from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext
from sparsattn.nn import get_layer
from sparsattn.nn.mixers._approx_lsh import lsh_projections, lsh_rank
from sparsattn.nn.mixers._approx_performer import orthogonal_features
from sparsattn.nn.mixers.scatterbrain import xbox_transform


def _qkv(B=1, Hq=4, Hkv=2, T=160, D=16, seed=0, dtype=torch.float32, s=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(s * torch.randn(B, h, T, D, generator=g, dtype=torch.float64).to(dtype) for h in (Hq, Hkv, Hkv))


def test_registered_as_an_attending_prefill_method():
    m = get_method("scatterbrain")
    assert "scatterbrain" in sparsattn.list_methods("prefill")
    assert m.computes_output and m.select(*_qkv()[:2]) is None
    assert (m.nb_features, m.cluster_size, m.lsh_num_projs, m.parts) == (None, 64, 7, "both")
    assert "2110.15343" in m.paper


def test_full_support_is_exact_attention_gqa_and_lse():
    q, k, v = _qkv(T=157)
    ref, lref = dense_reference(q, k, v, causal=True)
    cls = sparsattn.methods.method_class("scatterbrain")
    for cfg in (cls.full_config(157), {"cluster_size": 400, "nb_features": 8}, {"cluster_size": 157, "parts": "sparse"}):
        out, lse = get_method("scatterbrain", **cfg).attend(q, k, v, SelectContext(layer=0))
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), lref, atol=1e-5, rtol=1e-5)
    # a small support is approximate: the comparison above can fail
    out, _ = get_method("scatterbrain", cluster_size=8, lsh_num_projs=1).attend(q, k, v)
    assert not torch.allclose(out.double(), ref, atol=1e-3)


def test_float64_equals_the_mixer_layer_output():
    q, k, v = _qkv(B=2, Hq=3, Hkv=3, T=97, D=8, dtype=torch.float64)
    cfg = dict(nb_features=12, cluster_size=7, lsh_num_projs=3, seed=5)
    for parts in ("both", "sparse", "lowrank"):
        layer = get_layer("scatterbrain", 24, 3, causal=True, parts=parts, **cfg).double()
        o_ref, l_ref = layer.attend(q, k, v)
        st: dict = {}
        o, l = get_method("scatterbrain", parts=parts, **cfg).attend(q, k, v, stats=st)
        assert o.dtype == torch.float64 and torch.isfinite(o).all()
        torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(l, l_ref, atol=1e-12, rtol=1e-12)
        assert st == layer.last_stats


def _estimator_pairwise(q, k, v, *, c, m, r, seed):
    """The paper's estimator written out for one head in float64 (no stabiliser, no merge):
    y_i = [sum_{j<=i} phi_i.phi_j v_j + sum_{j in S_i} (e^{s_ij} - phi_i.phi_j) v_j] / [same without v],
    S_i = the c most recent keys j <= i of query i's LSH bucket (XBOX with running norm maxima)."""
    T, D = q.shape
    scale = D ** -0.5
    w = orthogonal_features(m, D, seed).double()
    proj = lsh_projections(D + 2, r, seed + 1).double()

    def phi(x):
        xs = x * scale ** 0.5
        return torch.exp(xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(m)

    q2, k2 = xbox_transform(q, k, running=True)
    qr, kr = lsh_rank(q2, proj), lsh_rank(k2, proj)
    a_lr = (phi(q) @ phi(k).T).tril()
    a_ex = torch.exp(q @ k.T * scale)
    corr = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        support = [j for j in range(i, -1, -1) if kr[j] == qr[i]][:c]
        for j in support:
            corr[i, j] = a_ex[i, j] - a_lr[i, j]
    a = a_lr + corr
    den = a.sum(-1)
    return (a @ v) / den[:, None], torch.log(den)


def test_float64_matches_the_papers_estimator_pair_by_pair():
    q, k, v = _qkv(B=1, Hq=2, Hkv=2, T=53, D=8, dtype=torch.float64, seed=3, s=0.7)
    cfg = dict(nb_features=16, cluster_size=5, lsh_num_projs=2, seed=2)
    o, l = get_method("scatterbrain", **cfg).attend(q, k, v)
    for h in range(2):
        y, lse = _estimator_pairwise(q[0, h], k[0, h], v[0, h], c=5, m=16, r=2, seed=2)
        torch.testing.assert_close(o[0, h], y, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(l[0, h], lse, atol=1e-10, rtol=1e-10)
    ref, _ = dense_reference(q, k, v, causal=True)
    assert not torch.allclose(o, ref, atol=1e-3)  # an approximation, not exact attention


def test_causal_earlier_rows_do_not_depend_on_later_tokens():
    q, k, v = _qkv(T=150, D=16, dtype=torch.float64, seed=7)
    m = get_method("scatterbrain", cluster_size=9, nb_features=24, lsh_num_projs=3)
    out, lse = m.attend(q, k, v)
    t = 90
    g = torch.Generator().manual_seed(11)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):  # later tokens replaced, larger norms (they would move SMYRF's maxima)
        x[:, :, t:] = 3 * torch.randn(x[:, :, t:].shape, generator=g, dtype=torch.float64)
    for qq, kk, vv in ((q[:, :, :t], k[:, :, :t], v[:, :, :t]), (q2, k2, v2)):
        o2, l2 = m.attend(qq, kk, vv)
        torch.testing.assert_close(o2[:, :, :t], out[:, :, :t], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(l2[:, :, :t], lse[:, :, :t], atol=1e-9, rtol=1e-9)
    assert not torch.allclose(m.attend(q2, k2, v2)[0][:, :, t:], out[:, :, t:])


def test_chunked_prefill_is_exact_and_non_causal_is_refused():
    q, k, v = _qkv(T=100)
    out, _ = get_method("scatterbrain", cluster_size=4).attend(q[:, :, -30:], k, v, SelectContext())
    ref, _ = dense_reference(q[:, :, -30:], k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        get_method("scatterbrain").attend(q, k, v, SelectContext(causal=False))


def test_bad_config_names_field():
    for name in ("nb_features", "cluster_size", "lsh_num_projs", "chunk"):
        for bad in (0, -1, 2.5, True, "8"):
            with pytest.raises(ValueError, match=name):
                get_method("scatterbrain", **{name: bad})
    with pytest.raises(ValueError, match="seed"):
        get_method("scatterbrain", seed=-1)
    with pytest.raises(ValueError, match="parts"):
        get_method("scatterbrain", parts="all")


def test_bfloat16_long_input_is_finite():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, T=1500, D=32, dtype=torch.bfloat16, s=4.0)
    out, lse = get_method("scatterbrain", cluster_size=32, nb_features=32).attend(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_patched_llama_equals_dense_at_full_support_and_runs_approximate(hf_util):
    from sparsattn.integrations import hf

    model = hf_util.make_model("llama", attn_implementation="sdpa")
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        with hf.patched(model, method={2: "scatterbrain", 3: "scatterbrain"}, backend="reference", cluster_size=96):
            full = model(ids).logits
        with hf.patched(model, method={3: get_method("scatterbrain", cluster_size=4, nb_features=8)},
                        backend="reference"):
            approx = model(ids).logits
            gen = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(full, ref, atol=2e-4, rtol=1e-4)
    assert torch.isfinite(approx).all() and not torch.allclose(approx, ref, atol=1e-4)
    assert gen.shape == (1, 99)
