"""sea mixer: exact at full budget (through the block-sparse kernel's reference), lse mergeable, the
compressed estimate against the true pooled attention, budget honoured, distillation loss, causal
layer never reads the future, training smoke, bad configs, bf16 on a long sequence."""
from __future__ import annotations

import pytest
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.nn import get_layer
from sparsattn.nn.base import attention_backend
from sparsattn.nn.mixers._approx_performer import orthogonal_features
from sparsattn.nn.mixers.sea import _estimate, column_of_key, sea_attention

from ._approx_checks import assert_lse_merges_with_extra_keys, bf16_long_finite, future_change, qkv
from .mixer_helpers import train_smoke

D = 16
F = orthogonal_features(44, D, 0)


@pytest.fixture(autouse=True)
def _reference_backend():
    with attention_backend("reference"):
        yield


@pytest.mark.parametrize("causal", [True, False])
def test_full_budget_is_exact(causal):
    q, k, v = qkv(T=150, D=D, dtype=torch.float32)
    ref, lref = dense_reference(q, k, v, causal=causal)
    out, lse = sea_attention(q, k, v, features=F, causal=causal, top_k=32, predictor_length=32, block_size=16)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lref, atol=2e-5, rtol=1e-4)


def test_lse_merges_with_exact_attention():
    assert_lse_merges_with_extra_keys(
        lambda q, k, v: sea_attention(q, k, v, features=F, top_k=16, predictor_length=16, block_size=16),
        *qkv(T=70, D=D, dtype=torch.float32), atol=2e-5)


def test_estimate_tracks_the_pooled_attention():
    q, k, _ = qkv(T=128, D=D, dtype=torch.float32, scale=0.5, seed=4)
    est = _estimate(q, k, orthogonal_features(4096, D, 1), D ** -0.5, 8, True, 32)
    s = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5
    p = torch.softmax(s.masked_fill(~torch.ones(128, 128, dtype=torch.bool).tril(), float("-inf")), -1)
    pooled = torch.matmul(p, torch.nn.functional.one_hot(column_of_key(128, 8), 8).float())
    assert torch.allclose(est.sum(-1), torch.ones(()), atol=1e-5)
    assert float((est - pooled).abs().sum(-1).mean()) < 0.15


def test_budget_is_honoured_and_error_falls_with_it():
    q, k, v = qkv(T=512, D=D, dtype=torch.float32, seed=6)
    k = q + 0.5 * k
    ref, _ = dense_reference(q, k, v, causal=True)
    errs, dens = [], []
    for top_k in (1, 4, 16):
        st: dict = {}
        out, _ = sea_attention(q, k, v, features=F, top_k=top_k, predictor_length=32, block_size=16, stats=st)
        errs.append(float((out.double() - ref).norm() / ref.norm()))
        dens.append(st["pairs"] / (2 * 512 * 513 / 2))
    assert dens[0] < dens[1] < dens[2] <= 1.0 and dens[0] < 0.25
    assert errs[0] > errs[1] > errs[2]


def test_distillation_loss_and_causal_selection():
    layer = get_layer("sea", 32, 2, top_k=1, predictor_length=16, block_size=16)
    x = torch.randn(2, 64, 32)
    layer.train()
    layer(x)
    loss = layer.extra_loss()
    assert loss is not None and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert layer.decoder.net[2].weight.grad.abs().sum() > 0  # distillation trains the estimator's decoder
    layer.eval()
    layer(x)
    assert layer.extra_loss() is None
    assert layer.pool == "previous"
    assert future_change(layer, T=96, t=40) == 0.0


def test_training_smoke_loss_falls():
    with attention_backend("reference"):
        first, last = train_smoke("sea", top_k=2, predictor_length=8, block_size=16)
    assert last < 0.8 * first, (first, last)


def test_bad_configs_name_the_argument():
    for name, bad in (("top_k", 0), ("predictor_length", 0), ("block_size", 24), ("performer_nb_factor", 0),
                      ("distill_rows", 0), ("distill_weight", -1.0), ("mix", 1), ("pool", "rows")):
        with pytest.raises(ValueError, match=name):
            get_layer("sea", 32, 2, **{name: bad})
    q, k, v = qkv(T=20, D=D, dtype=torch.float32)
    with pytest.raises(ValueError, match="features"):
        sea_attention(q, k, v, features=torch.zeros(4, 3))


def test_bf16_long_sequence_no_nan():
    feats = orthogonal_features(110, 32, 0)
    bf16_long_finite(lambda q, k, v: sea_attention(q, k, v, features=feats, top_k=4, predictor_length=64,
                                                   block_size=64), T=1024)
