import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext

from _sparse_decode_utils import assert_equals_dense, needle_case, selects


def _calibration(D=64, n_layers=2, outliers=(3, 10, 17, 40, 41, 50, 60, 63)):
    gen = torch.Generator().manual_seed(5)
    qs, ks = [], []
    for _ in range(n_layers):
        q = torch.randn(2, 8, 64, D, generator=gen)
        k = torch.randn(2, 2, 64, D, generator=gen)
        q[..., list(outliers)] *= 8
        k[..., list(outliers)] *= 8
        qs.append(q)
        ks.append(k)
    return qs, ks, sorted(outliers)


def test_calibration_finds_outlier_channels_and_round_trips(tmp_path):
    qs, ks, outl = _calibration()
    m = get_method("double_sparsity")
    assert not m.is_fitted
    with pytest.raises(ValueError, match="calibrat"):
        m.select(torch.randn(2, 8, 64), torch.randn(2, 2, 100, 64))
    ch = m.calibrate(qs, ks)
    assert ch[0] == [outl, outl] and ch[1] == [outl, outl]  # r = 64 / 8 = 8 channels
    path = tmp_path / "ds.json"
    m.save(str(path))
    m2 = get_method("double_sparsity").load(str(path))
    assert m2.channels == m.channels and m2.is_fitted


@pytest.mark.parametrize("bits", [4, 16])
def test_needle_found_at_small_budget(bits):
    qs, ks, _ = _calibration()
    q, k, v, pos = needle_case()
    m = get_method("double_sparsity", token_budget=64, label_bits=bits)
    m.calibrate(qs, ks)
    p = m.select(q, k, SelectContext(layer=1))
    assert int(p.counts.max()) == 64
    assert all(selects(p, b, h, pos[b]) for b in range(2) for h in range(2))


def test_full_budget_equals_dense_and_label_cache_is_incremental():
    qs, ks, _ = _calibration()
    q, k, v, _ = needle_case(T=300)
    m = get_method("double_sparsity", token_budget=300)
    m.calibrate(qs, ks)
    ctx = SelectContext(layer=0)
    for L in (250, 251, 300):
        kl = torch.tensor([L, L - 50])
        ctx.extras["kv_lens"] = kl
        p = m.select(q, k, ctx)
        assert_equals_dense(q, k, v, p, kl)
        assert ctx.state["double_sparsity"][0]["labels"].shape == (2, 2, 300, 8)
    # incremental labels equal a fresh computation
    fresh = SelectContext(layer=0, extras={"kv_lens": kl})
    m.select(q, k, fresh)
    assert torch.equal(fresh.state["double_sparsity"][0]["labels"], ctx.state["double_sparsity"][0]["labels"])
    with pytest.raises(ValueError, match="budget_ratio"):
        get_method("double_sparsity", budget_ratio=2.0)
