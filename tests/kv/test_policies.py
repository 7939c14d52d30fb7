"""KV policies: promised slots are kept, memory shrinks, RazorAttention compensation is exact, ZipVL error bound."""
import math

import pytest
import torch

from sparsattn.kv import (KVCache, MoAPolicy, RazorAttentionPolicy, StreamingLLMPolicy, ZipVLPolicy,
                          probe_importance, quantize_rows)


def _cache(B=2, H=2, D=16, T=(40, 25), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(2, B, H, D, dtype=dtype)
    Tm = max(T)
    k = torch.randn(B, H, Tm, D, generator=gen)
    v = torch.randn(B, H, Tm, D, generator=gen)
    cache.append(0, k, v, lens=torch.tensor(T))
    return cache, k, v


def _kept_positions(cache, layer):
    pos = cache.positions(layer)
    n = cache.lengths(layer)
    return [[set(pos[b, h, : int(n[b, h])].tolist()) for h in range(pos.shape[1])] for b in range(pos.shape[0])]


def _check_promise(policy, cache, **kw):
    promised = policy.promised(cache, 0)
    pos = cache.positions(0)
    want = [[set(pos[b, h][promised[b, h]].tolist()) - {-1} for h in range(pos.shape[1])] for b in range(pos.shape[0])]
    rep = policy.apply(cache, 0, **kw)
    got = _kept_positions(cache, 0)
    for b in range(len(want)):
        for h in range(len(want[b])):
            assert want[b][h] <= got[b][h], (b, h)
    return rep


def test_streaming_llm_policy_keeps_sinks_and_window():
    cache, k, v = _cache()
    rep = _check_promise(StreamingLLMPolicy(n_sink=4, window=8), cache)
    kept = _kept_positions(cache, 0)
    assert kept[0][0] == set(range(4)) | set(range(32, 40))
    assert kept[1][1] == set(range(4)) | set(range(17, 25))
    assert rep["bytes_after"] < rep["bytes_before"]
    # a new token arrives: the window slides
    cache.append(0, torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    StreamingLLMPolicy(n_sink=4, window=8).apply(cache, 0)
    assert _kept_positions(cache, 0)[0][0] == set(range(4)) | set(range(33, 41))


def test_razor_compensation_token_is_exact():
    cache, k, v = _cache(T=(40, 25))
    pol = RazorAttentionPolicy(retrieval_heads={0: [1]}, n_sink=2, compression=5.0, min_window=6)
    rep = _check_promise(pol, cache)
    # retrieval head 1 kept everything; head 0 of batch 0 kept 2 sinks + 8 recent (40/5) + 1 merged slot
    assert cache.lengths(0).tolist() == [[2 + 8 + 1, 40], [2 + 6 + 1, 25]]
    # no token lost: the slot weights add up to the tokens seen
    lw = cache.log_weights(0)
    n = cache.lengths(0)
    for b, T in enumerate((40, 25)):
        for h in range(2):
            w = lw[b, h, : int(n[b, h])].double().exp().sum().item()
            assert abs(w - T) < 1e-4 * T  # log-weights are float32
    # attention through the kernel equals the formula with n_d e^{q.k_hat}
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 16, generator=gen)
    out = cache.attend(0, q, backend="reference")
    b, h, T = 0, 0, 40
    kept = list(range(2)) + list(range(32, 40))
    drop = [i for i in range(T) if i not in kept]
    kh, vh = k[b, h, drop].double().mean(0), v[b, h, drop].double().mean(0)
    s = k[b, h, kept].double() @ q[b, h].double() / 4.0
    sc = kh @ q[b, h].double() / 4.0
    e, ec = s.exp(), len(drop) * sc.exp()
    want = ((e[:, None] * v[b, h, kept].double()).sum(0) + ec * vh) / (e.sum() + ec)
    assert torch.allclose(out[b, h].double(), want, atol=1e-5)
    # a shared (heads=1) slot selection on a layer with compensation tokens: per-head weights apply
    from sparsattn.patterns import TokenPattern
    shared = TokenPattern.from_lists([[list(range(11))], [list(range(9))]], cache.get(0)[0].shape[2])
    out2 = cache.attend(0, q, shared, backend="reference")
    assert torch.allclose(out2[0, 0].double(), want, atol=1e-5)
    # a second compression folds the old compensation token into the new one (still no loss)
    cache.append(0, torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16))
    pol.apply(cache, 0)
    w = cache.log_weights(0)[0, 0, : int(cache.lengths(0)[0, 0])].double().exp().sum().item()
    assert abs(w - 70) < 1e-4 * 70
    assert rep["bytes_after"] < rep["bytes_before"]


def test_moa_per_head_spans():
    cache, _, _ = _cache(T=(40, 40))
    pol = MoAPolicy(alpha=[[4, 10], [0, 0]], beta=[[0.25, 0.0], [1, 1]], n_sink=2)
    _check_promise(pol, cache)
    assert cache.lengths(0).tolist() == [[2 + 14, 2 + 10]] * 2  # 4 + 0.25*40 = 14; 10
    with pytest.raises(ValueError, match="beta"):
        MoAPolicy(alpha=[[1]], beta=[[2.0]])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantisation_error_bound(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 2, 50, 33, generator=gen) * torch.rand(3, 2, 50, 1, generator=gen) * 10
    q = quantize_rows(x, bits)
    err = (q.dequantize() - x).abs()
    assert (err <= q.scale / 2 + 1e-6).all()
    # and the bound is meaningful: at most max|x| / (2 * qmax)
    qmax = 2 ** (bits - 1) - 1
    assert (err <= x.abs().amax(-1, keepdim=True) / (2 * qmax) + 1e-6).all()
    assert q.nbytes() < x.numel() * 2 * (0.6 if bits == 8 else 0.35)


def test_zipvl_layer_adaptive_mixed_precision():
    gen = torch.Generator().manual_seed(3)
    B, Hq, H, D, T = 1, 4, 2, 32, 64
    k = torch.randn(B, H, T, D, generator=gen)
    v = torch.randn(B, H, T, D, generator=gen)
    qp = torch.randn(B, Hq, 8, D, generator=gen)
    k2 = k.clone()
    k2[:, :, 20] = qp[:, ::2, -1] * 2  # a key strongly aligned with the probes -> important
    cache2 = KVCache(1, B, H, D, dtype=torch.float32)
    cache2.append(0, k2, v)
    imp = probe_importance(qp, k2, torch.arange(T - 8, T))
    assert imp.shape == (B, H, T)
    pol = ZipVLPolicy(tau=0.9, hi_bits=8, lo_bits=4)
    rep = pol.apply(cache2, 0, importance=imp)
    p = rep["important"]
    assert 1 <= p < T and rep["bytes_after"] < rep["bytes_before"]
    mp = cache2.layers[0].quant
    assert (mp.hi_idx == 20).any(-1).all()  # the aligned key is kept at high precision
    kd, vd = cache2.get(0)
    assert torch.equal(cache2.positions(0)[0, 0], torch.arange(T))
    hi_err = (kd.gather(2, mp.hi_idx[..., None].expand(-1, -1, -1, D)) - k2.gather(2, mp.hi_idx[..., None].expand(-1, -1, -1, D))).abs()
    lo_err = (kd.gather(2, mp.lo_idx[..., None].expand(-1, -1, -1, D)) - k2.gather(2, mp.lo_idx[..., None].expand(-1, -1, -1, D))).abs()
    assert (hi_err <= mp.k_hi.scale / 2 + 1e-6).all() and (lo_err <= mp.k_lo.scale / 2 + 1e-6).all()
    # decode attention over the dequantised cache is close to the full-precision one
    q = torch.randn(B, Hq, D, generator=gen)
    a = cache2.attend(0, q, backend="reference")
    ref = KVCache(1, B, H, D, dtype=torch.float32)
    ref.append(0, k2, v)
    assert (a - ref.attend(0, q, backend="reference")).abs().max() < 0.1
    # nothing evicted: every token still present
    assert pol.promised(cache2, 0).all()
    # the count is layer-adaptive: tau = 1 keeps every token
    assert ZipVLPolicy(tau=1.0).important_count(imp) == T
    with pytest.raises(ValueError, match="tau"):
        ZipVLPolicy(tau=0)
