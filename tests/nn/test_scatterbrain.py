"""scatterbrain mixer: the estimator against a dense float64 reference of the paper's formula on a
known support, exact at full budget, no double counting, lse mergeable, each part alone, causal
layer never reads the future, training smoke, bad configs, bf16 on a long sequence."""
from __future__ import annotations

import math

import pytest
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.nn import get_layer
from sparsattn.nn.mixers._approx_logfavor import log_linear_attention
from sparsattn.nn.mixers._approx_lsh import lsh_projections
from sparsattn.nn.mixers._approx_performer import favor_features, orthogonal_features
from sparsattn.nn.mixers.scatterbrain import scatterbrain_attention

from ._approx_checks import assert_lse_merges_with_extra_keys, bf16_long_finite, future_change, qkv
from .mixer_helpers import train_smoke

D = 16
F = orthogonal_features(64, D, 0)
ONE_BUCKET = torch.zeros(D + 2, 3)  # every hash bit 0: one bucket, the sort keeps token order


def _reference(q, k, v, support, causal):
    """The paper's estimator, densely in float64: low-rank everywhere, corrected to exact on S."""
    T = q.shape[2]
    scale = D ** -0.5
    fq, cq = favor_features(q, F, scale, is_query=True)
    fk, ck = favor_features(k, F, scale, is_query=False)
    a = torch.matmul(fq, fk.transpose(-1, -2)) * torch.exp(cq[..., None] + ck[..., None, None])
    e = torch.exp(torch.matmul(q, k.transpose(-1, -2)) * scale)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    w = torch.where(support & allowed, e, a) * allowed
    return torch.matmul(w, v) / w.sum(-1, keepdim=True), torch.log(w.sum(-1))


@pytest.mark.parametrize("assign", ["rank", "window"])
def test_estimator_matches_dense_float64_formula(assign):
    q, k, v = qkv(T=40, D=D, scale=0.5)
    c = 8
    i = torch.arange(40)
    if assign == "window":  # the c most recent keys of the one bucket: a sliding window
        support = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < c)
    else:  # equal chunks of the (unchanged) order
        support = (i[:, None] // c) == (i[None, :] // c)
    out, lse = scatterbrain_attention(q, k, v, features=F, lsh_proj=ONE_BUCKET, cluster_size=c, assign=assign,
                                      chunk=16)  # three chunks of the causal scan, the last one padded
    ref, lref = _reference(q, k, v, support, causal=True)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse, lref, atol=1e-9, rtol=1e-9)
    sparse, lsp = scatterbrain_attention(q, k, v, features=F, lsh_proj=ONE_BUCKET, cluster_size=c, assign=assign,
                                         parts="sparse")
    ref_s, lref_s = dense_reference(q, k, v, mask=(support & (i[None, :] <= i[:, None]))[None, None])
    torch.testing.assert_close(sparse, ref_s, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lsp, lref_s, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("assign", ["rank", "window"])
@pytest.mark.parametrize("causal", [True, False])
def test_full_support_is_exact_no_double_counting(assign, causal):
    q, k, v = qkv(T=75, D=D)
    ref, lref = dense_reference(q, k, v, causal=causal)
    out, lse = scatterbrain_attention(q, k, v, features=F, lsh_proj=lsh_projections(D + 2, 4, 1), causal=causal,
                                      cluster_size=75, assign=assign)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse, lref, atol=1e-9, rtol=1e-9)


def test_lse_merges_with_exact_attention():
    assert_lse_merges_with_extra_keys(
        lambda q, k, v: scatterbrain_attention(q, k, v, features=F, lsh_proj=ONE_BUCKET, cluster_size=100),
        *qkv(T=60, D=D))


def test_combination_beats_each_part_on_smooth_attention():
    # small logits: the low-rank part estimates the far keys well, the clusters are exact
    q, k, v = qkv(T=256, D=D, scale=0.4, seed=2)
    ref, _ = dense_reference(q, k, v, causal=True)
    feats = orthogonal_features(256, D, 0)
    err = {}
    for parts in ("both", "sparse", "lowrank"):
        out, _ = scatterbrain_attention(q, k, v, features=feats, lsh_proj=lsh_projections(D + 2, 3, 1),
                                        cluster_size=32, parts=parts)
        err[parts] = float((out - ref).norm() / ref.norm())
    assert err["both"] < err["sparse"] and err["both"] < err["lowrank"], err


def test_causal_layer_does_not_read_the_future_but_the_paper_rule_does():
    cfg = dict(cluster_size=8, nb_features=8)
    assert future_change(get_layer("scatterbrain", 32, 2, **cfg)) < 1e-5  # performer stabiliser rounding only
    assert future_change(get_layer("scatterbrain", 32, 2, assign="rank", **cfg)) > 1e-3


def test_training_smoke_loss_falls():
    first, last = train_smoke("scatterbrain", cluster_size=8, nb_features=16)
    assert last < 0.8 * first, (first, last)


def test_bad_configs_name_the_argument():
    for name, bad in (("cluster_size", 0), ("nb_features", 0), ("lsh_num_projs", 0), ("parts", "all"),
                      ("assign", "x"), ("seed", -2)):
        with pytest.raises(ValueError, match=name):
            get_layer("scatterbrain", 32, 2, **{name: bad})
    q, k, v = qkv(T=20, D=D)
    with pytest.raises(ValueError, match="features"):
        scatterbrain_attention(q, k, v, features=torch.zeros(4, 3), lsh_proj=ONE_BUCKET)
    with pytest.raises(ValueError, match="lsh_proj"):
        scatterbrain_attention(q, k, v, features=F, lsh_proj=torch.zeros(D, 3))


def test_bf16_long_sequence_no_nan():
    feats, proj = orthogonal_features(int(32 * math.log(32)), 32, 0), lsh_projections(34, 7, 1)
    for assign in ("rank", "window"):
        bf16_long_finite(lambda q, k, v: scatterbrain_attention(q, k, v, features=feats, lsh_proj=proj,
                                                                cluster_size=64, assign=assign), T=1024)


def _large_norm_layer(width, gain=16.0, **cfg):
    """The MQAR preset layer with q/k/v projections scaled up, as a trained model's (logits of
    several hundred at gain 16: rows whose Performer normaliser underflowed under one key stabiliser)."""
    torch.manual_seed(0)
    layer = get_layer("scatterbrain", width, 2, cluster_size=32, nb_features=32, **cfg)
    with torch.no_grad():
        layer.qkv_proj.weight.mul_(gain)
    return layer


@pytest.mark.parametrize("assign", ["window", "rank"])
@pytest.mark.parametrize("width", [128, 256])
def test_bf16_autocast_large_norm_forward_and_backward_finite(width, assign):
    # the GPU failure of 2026-12-05 (non-finite loss in bf16 at widths 128/256): NaN gradients from the
    # division by a row's underflowed low-rank normaliser
    layer = _large_norm_layer(width, assign=assign)
    x = torch.randn(4, 256, width, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        loss = y.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(y).all()
    for name, p in [*layer.named_parameters(), ("x", x)]:
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("assign", ["window", "rank"])
def test_float32_matches_float64_at_large_norms(assign):
    # the low-rank sums in log scale: float32 is float64 up to rounding even where one stabiliser over
    # all keys let rows' normalisers underflow (before: relative error 9e11 (window), 0.11 (rank))
    layer = _large_norm_layer(128)
    x = torch.nn.functional.layer_norm(torch.randn(2, 256, 128, generator=torch.Generator().manual_seed(2)), (128,))
    with torch.no_grad():
        q, k, v = layer.split(x)
        kw = dict(features=layer.features, lsh_proj=layer.lsh_proj, cluster_size=32, assign=assign)
        out, lse = scatterbrain_attention(q, k, v, **kw)
        ref, lref = scatterbrain_attention(q.double(), k.double(), v.double(), **kw)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-4
    torch.testing.assert_close(lse.double(), lref, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_log_linear_attention_is_the_favor_sums_in_log_scale(causal):
    # the scan over chunks (odd length: a padded last chunk) against the dense float64 sums
    # (1/m) sum_r exp(a_ir + b_jr) [v_j], on exponents spread over hundreds (where one stabiliser underflows)
    g = torch.Generator().manual_seed(4)
    T, m = 53, 6
    a = torch.randn(2, T, m, generator=g, dtype=torch.float64) * 8
    b = (torch.randn(2, T, m, generator=g, dtype=torch.float64) * 8
         - 300 * torch.rand(2, T, 1, generator=g, dtype=torch.float64))
    v = torch.randn(2, T, 3, generator=g, dtype=torch.float64)
    num, den, C = log_linear_attention(a, b, v, causal=causal, chunk=16)
    s = torch.logsumexp(a[:, :, None, :] + b[:, None, :, :], -1) - math.log(m)
    if causal:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    torch.testing.assert_close(torch.log(den) + C, lse, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(num / den[..., None], torch.softmax(s, -1) @ v, atol=1e-9, rtol=1e-9)
    assert (den >= 1 / m - 1e-12).all()
    num32, den32, C32 = log_linear_attention(a.float(), b.float(), v.float(), causal=causal, chunk=16)
    torch.testing.assert_close((torch.log(den32) + C32).double(), lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close((num32 / den32[..., None]).double(), torch.softmax(s, -1) @ v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("assign", ["window", "rank"])
def test_gradients_through_the_detached_stabilisers(assign):
    # the row/feature stabilisers are detached shifts: the gradient is still that of the estimator
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 21, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    feats, proj = orthogonal_features(6, 4, 0), lsh_projections(6, 2, 1)
    assert torch.autograd.gradcheck(
        lambda q, k, v: scatterbrain_attention(q * 3, k * 3, v, features=feats, lsh_proj=proj, cluster_size=4, chunk=8,
                                               assign=assign), (q, k, v))
