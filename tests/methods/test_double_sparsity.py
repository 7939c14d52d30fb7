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
        st = ctx.state["double_sparsity"][0]
        assert st["codes"].shape == (2, 2, 300, 4) and st["codes"].dtype == torch.uint8  # r = 8: 4 bytes a token
    # incremental labels equal a fresh computation
    fresh = SelectContext(layer=0, extras={"kv_lens": kl})
    m.select(q, k, fresh)
    for name in ("codes", "scale", "zero"):
        assert torch.equal(fresh.state["double_sparsity"][0][name], ctx.state["double_sparsity"][0][name])
    with pytest.raises(ValueError, match="budget_ratio"):
        get_method("double_sparsity", budget_ratio=2.0)


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_labels_round_trip_within_quantisation_error(bits):
    qs, ks, outl = _calibration()
    q, k, v, _ = needle_case(T=200)
    k = k * torch.linspace(0.1, 5.0, 200)[None, None, :, None]  # per-token ranges differ
    m = get_method("double_sparsity", token_budget=32, label_bits=bits)
    m.calibrate(qs, ks)
    ctx = SelectContext(layer=1)
    for L in (150, 151, 200):  # incremental writes, capacity growth
        ctx.extras["kv_lens"] = torch.tensor([L, L])
        m.select(q, k[:, :, :L], ctx)
    st = ctx.state["double_sparsity"][1]
    lab = k[..., outl].float()  # the fp labels [B, Hkv, T, r]
    deq = m.dequantized_labels(st, 200)
    err = (deq - lab).abs()
    bound = st["scale"][:, :, :200].float() / 2 + 2 ** -10 * lab.abs().amax(-1, keepdim=True)
    assert bool((err <= bound + 1e-6).all())
    assert float(err.max()) > 0  # really quantised
    # bytes: codes (r / 2 bytes at 4 bits, r at 8) + float16 scale and zero per token
    cap = st["codes"].shape[2]
    per_token = (len(outl) // 2 if bits == 4 else len(outl)) + 4
    assert m.label_nbytes(ctx.state, 1) == ctx.extras["label_bytes"] == 2 * 2 * cap * per_token
    assert per_token < len(outl) * 2  # smaller than fp16 labels


def test_packed_label_top_k_equals_fp_label_top_k_when_well_separated():
    """64 planted tokens per sequence score far above the others on the outlier channels: the 4-bit
    packed labels select exactly the tokens the unquantised labels select."""
    qs, ks, outl = _calibration()
    gen = torch.Generator().manual_seed(11)
    B, Hkv, G, T, D = 2, 2, 4, 600, 64
    u = torch.randn(B, Hkv, 1, D, generator=gen)
    q = (u + 0.2 * torch.randn(B, Hkv, G, D, generator=gen)).reshape(B, Hkv * G, D)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    planted = [torch.randperm(T, generator=gen)[:64] for _ in range(B)]
    for b in range(B):
        strength = 4 + 2 * torch.rand(64, generator=gen)
        k[b, :, planted[b]] = strength[None, :, None] * u[b] + 0.3 * torch.randn(Hkv, 64, D, generator=gen)
    pats = {}
    for bits in (4, 16):
        m = get_method("double_sparsity", token_budget=64, label_bits=bits)
        m.calibrate(qs, ks)
        pats[bits] = m.select(q, k, SelectContext(layer=0)).to_token_mask()
    assert torch.equal(pats[4], pats[16])
    for b in range(B):
        assert set(pats[4][b, 0].nonzero().flatten().tolist()) == set(planted[b].tolist())
