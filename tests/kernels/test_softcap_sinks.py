"""Logit soft-capping (Gemma 2) and learned sink logits (gpt-oss) in the block-sparse and decode kernels.

Triton (the interpreter on a CPU) vs the torch reference vs a float64 dense masked softmax with the
same cap and sinks: forward, lse and gradients (dq, dk, dv and d sinks) on small odd shapes, GQA,
empty rows, padded sequences and a pattern with key columns; the decode kernel with split-K.
"""
import math

import pytest
import torch

import sparsattn as sa
from sparsattn import patterns as P
from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.kernels.sparse_decode import sparse_decode_attention
from sparsattn.kernels.sparse_decode.triton import sparse_decode_triton
from sparsattn.patterns import TokenPattern

from .conftest_helpers import rel


def _qkv(B, Hq, Hkv, T, D, device, amp=2.0):
    """Inputs large enough (scores of several units) that a cap of 2-3 changes the result."""
    q = torch.randn(B, Hq, T, D, device=device) * amp
    k = torch.randn(B, Hkv, T, D, device=device) * amp
    v = torch.randn(B, Hkv, T, D, device=device)
    return q, k, v


def _grads(backend, q, k, v, pattern, g, **kw):
    qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
    sinks = kw.pop("sinks", None)
    ss = None if sinks is None else sinks.detach().clone().requires_grad_()
    out, lse = sa.attention(qq, kk, vv, pattern, return_lse=True, backend=backend, sinks=ss, **kw)
    (out.float() * g).sum().backward()
    return out, lse, qq.grad, kk.grad, vv.grad, (None if ss is None else ss.grad)


def _dense64(q, k, v, mask, g, softcap, sinks, rows=None):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s64 = None if sinks is None else sinks.detach().double().requires_grad_()
    out, lse = dense_reference(q64, k64, v64, mask=mask, softcap=softcap, sinks=s64)
    if rows is not None:  # padded rows: zeros and -inf, as the kernels leave them
        out = out * rows[..., None]
        lse = torch.where(rows, lse, torch.full_like(lse, float("-inf")))
    (out * g.double()).sum().backward()
    return out, lse, q64.grad, k64.grad, v64.grad, (None if s64 is None else s64.grad)


def _compare(got, want, tol, what):
    names = ("out", "lse", "dq", "dk", "dv", "dsinks")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, f"{what} {name}: expected no gradient"
            continue
        assert not torch.isnan(a).any(), f"{what} {name}: NaN"
        if name == "lse":
            fin = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), fin), f"{what} lse: -inf rows differ"
            assert (a.double() - b)[fin].abs().max() <= 1e-4, f"{what} lse"
        else:
            assert rel(a, b) <= tol, (what, name, rel(a, b))


@pytest.mark.parametrize("case", ["causal-empty-rows", "vslash-columns-padded"])
def test_triton_and_reference_match_dense_float64(case, device):
    """Both backends equal the float64 dense softmax with cap and sinks, forward and backward; a
    query block with no key gives zeros and ``lse = sink``; padded rows give ``-inf`` and no sink
    gradient."""
    B, Hq, Hkv, D, bs = 2, 4, 2, 24, 16
    kw, rows = {}, None
    if case == "causal-empty-rows":
        T = 37
        n = -(-T // bs)
        blocks = torch.rand(B, Hq, n, n, device=device) < 0.6
        blocks[:, :, 1] = False  # query block 1 has no key at all
        pattern = P.from_block_mask(blocks, block_size=bs, q_len=T, causal=True)
        mask = pattern.to_dense_mask()
    else:
        T = 45
        vert = torch.stack([torch.randperm(T, device=device)[:5] for _ in range(B * Hkv)]).view(B, Hkv, 5)
        sl = torch.stack([torch.randperm(T // 2, device=device)[:2] for _ in range(B * Hkv)]).view(B, Hkv, 2)
        sl[..., 0] = 0
        pattern = P.vertical_slash(T, vert, sl, block_size=bs)
        assert pattern.columns is not None
        lens = torch.tensor([T, 30], device=device)
        kw = dict(q_lens=lens, kv_lens=lens)
        mask = pattern.to_dense_mask(q_lens=lens, kv_lens=lens).repeat_interleave(Hq // Hkv, 1)
        rows = (torch.arange(T, device=device)[None, :] < lens[:, None])[:, None, :].expand(B, Hq, T)
    q, k, v = _qkv(B, Hq, Hkv, T, D, device)
    sinks = torch.randn(Hq, device=device) + 1.0
    softcap = 2.5
    g = torch.randn(B, Hq, T, D, device=device)
    want = _dense64(q, k, v, mask, g, softcap, sinks, rows)
    for backend in ("reference", "triton"):
        got = _grads(backend, q, k, v, pattern, g, softcap=softcap, sinks=sinks, **kw)
        _compare(got, want, 1e-4, backend)
    if case == "causal-empty-rows":  # rows without keys: zeros, lse = the head's sink
        empty = ~mask.any(-1)
        assert empty.any()
        assert got[0][empty].abs().max() == 0
        torch.testing.assert_close(got[1][empty], sinks.float()[None, :, None].expand_as(got[1])[empty])
    # the cap and the sinks both matter at these magnitudes (the test can fail)
    plain, _ = dense_reference(q.double(), k.double(), v.double(), mask=mask)
    assert rel(want[0], plain) > 0.05


def test_each_alone_and_no_sink_equivalence(device):
    """Softcap alone and sinks alone (reference vs float64); a sink of -inf is no sink at all."""
    q, k, v = _qkv(1, 2, 1, 29, 16, device)
    p = P.causal(29, block_q=16, device=device)
    mask = p.to_dense_mask()
    for softcap, sinks in ((3.0, None), (None, torch.tensor([0.5, 4.0], device=device))):
        out, lse = sa.attention(q, k, v, p, return_lse=True, backend="reference", softcap=softcap, sinks=sinks)
        ro, rl = dense_reference(q.double(), k.double(), v.double(), mask=mask, softcap=softcap, sinks=sinks)
        assert rel(out, ro) < 1e-5 and (lse.double() - rl).abs().max() < 1e-4
    for backend in ("reference", "triton"):
        none = sa.attention(q, k, v, p, backend=backend)
        ninf = sa.attention(q, k, v, p, backend=backend, sinks=torch.full((2,), float("-inf"), device=device))
        torch.testing.assert_close(ninf, none, rtol=1e-6, atol=1e-6)


def test_arguments_are_validated(device):
    q, k, v = _qkv(1, 2, 1, 8, 16, device)
    for bad in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="softcap"):
            sa.attention(q, k, v, softcap=bad)
    for bad in (torch.zeros(3, device=device), torch.zeros(2, dtype=torch.long, device=device),
                torch.tensor([0.0, float("nan")], device=device), [0.0, 1.0]):
        with pytest.raises(ValueError, match="sinks"):
            sa.attention(q, k, v, sinks=bad)
    with pytest.raises(ValueError, match="sinks"):
        sparse_decode_attention(q[:, :, 0], k, v, sinks=torch.zeros(1, device=device))
    with pytest.raises(ValueError, match="softcap"):
        sparse_decode_attention(q[:, :, 0], k, v, softcap=-2)


def _decode_dense64(q, k, v, keep, softcap, sinks, lw=None):
    G = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhtd->bht", q.double(), kk) / math.sqrt(q.shape[-1])
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if lw is not None:
        s = s + lw
    s = s.masked_fill(~keep, float("-inf"))
    s = torch.cat([s, sinks.double()[None, :, None].expand(s.shape[0], -1, 1)], -1)
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bht,bhtd->bhd", torch.exp(s - lse[..., None])[..., :-1], vv), lse


def test_decode_kernel_and_reference(device):
    """Sparse decode with cap and sinks: a token pattern with log-weights, per-sequence lengths,
    split-K (fused and two-kernel merges: the sink counted once) against float64."""
    B, Hq, Hkv, T, D = 2, 6, 2, 41, 20
    q = torch.randn(B, Hq, D, device=device) * 2
    k = torch.randn(B, Hkv, T, D, device=device) * 2
    v = torch.randn(B, Hkv, T, D, device=device)
    sinks = torch.randn(Hq, device=device) + 1.0
    kl = torch.tensor([T, 23], device=device)
    sel = torch.rand(B, Hkv, T, device=device) < 0.5
    sel &= torch.arange(T, device=device)[None, None, :] < kl[:, None, None]
    tp = TokenPattern.from_mask(sel, kv_len=T)
    lw = torch.rand(B, Hkv, tp.indices.shape[-1], device=device)
    # the per-token log-weight in dense layout, for the float64 reference
    lw_dense = torch.zeros(B, Hkv, T, dtype=torch.float64, device=device)
    for b in range(B):
        for h in range(Hkv):
            n = int(tp.counts[b, h])
            lw_dense[b, h, tp.indices[b, h, :n].long()] = lw[b, h, :n].double()
    G = Hq // Hkv
    keep = sel.repeat_interleave(G, 1)
    want_o, want_l = _decode_dense64(q, k, v, keep, 2.0, sinks, lw_dense.repeat_interleave(G, 1))
    for backend in ("reference", "triton"):
        o, l = sparse_decode_attention(q, k, v, tp, kv_lens=kl, backend=backend, return_lse=True, softcap=2.0,
                                       sinks=sinks, log_weight=lw)
        assert rel(o, want_o) < 1e-5 and (l.double() - want_l).abs().max() < 1e-4, backend
    dense_keep = (torch.arange(T, device=device)[None, None, :] < kl[:, None, None]).expand(B, Hq, T)
    want_o, want_l = _decode_dense64(q, k, v, dense_keep, 2.0, sinks)
    for fused in (True, False):  # 3 splits of 16 tokens: split 0 carries the sink
        o, l = sparse_decode_triton(q, k, v, None, None, kl.to(torch.int32), scale=D ** -0.5, page_size=1,
                                    num_splits=3, block_n=16, fused_merge=fused, softcap=2.0, sinks=sinks)
        assert rel(o, want_o) < 1e-5 and (l.double() - want_l).abs().max() < 1e-4, fused
