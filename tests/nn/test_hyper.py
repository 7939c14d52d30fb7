"""hyper (HyperAttention) mixer: exact at full budget (float64), lse mergeable, approximation with
fewer pairs, causal layer never reads the future (the paper's block rule would), training smoke,
bad configs, bf16 on a long sequence."""
from __future__ import annotations

import pytest
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.nn import get_layer
from sparsattn.nn.mixers._approx_lsh import gray_rank, lsh_projections
from sparsattn.nn.mixers.hyper import hyper_attention

from ._approx_checks import assert_lse_merges_with_extra_keys, bf16_long_finite, future_change, qkv
from .mixer_helpers import train_smoke

P = lsh_projections(16, 7, 0)


@pytest.mark.parametrize("assign", ["rank", "window"])
@pytest.mark.parametrize("causal", [True, False])
def test_full_budget_is_exact_float64(assign, causal):
    q, k, v = qkv(T=157)
    ref, lref = dense_reference(q, k, v, causal=causal)
    for cfg in ({"min_seq_len": 4096}, {"min_seq_len": 16, "block_size": 157}):
        out, lse = hyper_attention(q, k, v, proj=P, causal=causal, assign=assign, **cfg)
        assert out.dtype == torch.float64 and lse.dtype == torch.float64
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse, lref, atol=1e-10, rtol=1e-10)


def test_lse_merges_with_exact_attention():
    assert_lse_merges_with_extra_keys(lambda q, k, v: hyper_attention(q, k, v, proj=P, min_seq_len=24, block_size=64),
                                      *qkv(T=90))


@pytest.mark.parametrize("assign", ["rank", "window"])
def test_approximation_uses_fewer_pairs_and_estimates_the_normaliser(assign):
    # keys that repeat the queries' directions: the heavy entries are found by the LSH
    q, k, v = qkv(T=512, scale=1.0)
    k = q + 0.1 * k
    st: dict = {}
    g = torch.Generator().manual_seed(0)
    out, lse = hyper_attention(q, k, v, proj=P, min_seq_len=64, block_size=32, sample_size=32, assign=assign,
                               generator=g, stats=st)
    ref, lref = dense_reference(q, k, v, causal=True)
    assert st["pairs"] < 0.6 * 2 * 512 * 513 / 2
    assert float((out - ref).norm() / ref.norm()) < 0.5
    assert float((lse - lref).abs().mean()) < 0.3


def test_gray_rank_orders_buckets_by_one_bit_steps():
    codes = torch.arange(128)
    order = torch.argsort(gray_rank(codes, 7))
    steps = (order[1:] ^ order[:-1]).tolist()
    assert all(bin(s).count("1") == 1 for s in steps)


def test_causal_layer_does_not_read_the_future_but_the_paper_rule_does():
    cfg = dict(min_seq_len=8, block_size=4, sample_size=4)
    assert future_change(get_layer("hyper", 32, 2, **cfg)) == 0.0  # assign=None -> "window" when causal
    assert future_change(get_layer("hyper", 32, 2, assign="rank", **cfg)) > 1e-3


def test_training_smoke_loss_falls():
    first, last = train_smoke("hyper", min_seq_len=12, block_size=6, sample_size=4)
    assert last < 0.8 * first, (first, last)


def test_bad_configs_name_the_argument():
    for name, bad in (("block_size", 0), ("sample_size", -1), ("min_seq_len", 0), ("lsh_num_projs", 0),
                      ("lsh_num_projs", 31), ("assign", "sorted"), ("seed", -1)):
        with pytest.raises(ValueError, match=name):
            get_layer("hyper", 32, 2, **{name: bad})
    q, k, v = qkv(T=20)
    with pytest.raises(ValueError, match="proj"):
        hyper_attention(q, k, v, proj=torch.zeros(3, 7))
    with pytest.raises(ValueError, match="k"):
        hyper_attention(q, k[:, :, :10], v[:, :, :10], proj=P)
    with pytest.raises(ValueError, match="scale"):
        hyper_attention(q, k, v, proj=P, scale=-1.0)


def test_bf16_long_sequence_no_nan():
    proj = lsh_projections(32, 7, 0)
    bf16_long_finite(lambda q, k, v: hyper_attention(q, k, v, proj=proj, min_seq_len=256, block_size=64,
                                                     sample_size=64, assign="window"))
