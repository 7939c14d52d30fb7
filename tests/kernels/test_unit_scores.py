"""Unit-score kernels (Triton, interpreted on the CPU) vs their torch references and vs the
definitions written out element by element."""
import os

import pytest
import torch

from sparsattn.kernels.unit_scores import bound_scores, label_scores, unpack_codes

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU) or CUDA")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B,Hkv,G,n,D,dtype,reduce", [
    (2, 3, 4, 77, 64, torch.float32, "max"),
    (1, 2, 3, 130, 40, torch.bfloat16, "mean"),
    (3, 1, 1, 5, 128, torch.float16, "sum"),
    (2, 2, 5, 66, 32, torch.float32, "none"),
])
def test_bound_scores(B, Hkv, G, n, D, dtype, reduce):
    gen = torch.Generator().manual_seed(n + D)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEV, dtype)
    a = torch.randn(B, Hkv, n, D, generator=gen)
    b = torch.randn(B, Hkv, n, D, generator=gen)
    lo, hi = torch.minimum(a, b).to(DEV, dtype), torch.maximum(a, b).to(DEV, dtype)
    got = bound_scores(q, lo, hi, reduce=reduce, mult=0.5, backend="triton")
    ref = bound_scores(q, lo, hi, reduce=reduce, mult=0.5, backend="reference")
    # the definition, element by element, in float64
    qq = q.double().view(B, Hkv, G, 1, D)
    full = torch.maximum(qq * lo.double()[:, :, None], qq * hi.double()[:, :, None]).sum(-1)  # [B, Hkv, G, n]
    want = {"max": full.amax(2), "mean": full.mean(2), "sum": full.sum(2), "none": full.flatten(1, 2)}[reduce] * 0.5
    assert got.dtype == torch.float32 and got.shape == want.shape
    tol = 1e-4 if dtype == torch.float32 else 0.05
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= tol * scale
    assert (ref.double() - want).abs().max().item() <= tol * scale


@pytest.mark.parametrize("bits,r,G,reduce", [(4, 16, 4, "max"), (4, 7, 3, "none"), (8, 5, 2, "mean"), (8, 16, 1, "sum")])
def test_label_scores(bits, r, G, reduce):
    gen = torch.Generator().manual_seed(bits * 10 + r)
    B, Hkv, n = 2, 3, 101
    levels = 16 if bits == 4 else 256
    raw = torch.randint(0, levels, (B, Hkv, n, r), generator=gen, dtype=torch.uint8)
    if bits == 4:  # pack: channel 2i low nibble, 2i + 1 high nibble
        padded = torch.cat([raw, raw.new_zeros(B, Hkv, n, r % 2)], -1)
        codes = padded[..., 0::2] | (padded[..., 1::2] << 4)
    else:
        codes = raw.clone()
    assert torch.equal(unpack_codes(codes, r, bits), raw)
    scale = torch.rand(B, Hkv, n, generator=gen).half()
    zero = torch.randn(B, Hkv, n, generator=gen).half()
    qc = torch.randn(B, Hkv * G, r, generator=gen)
    args = [t.to(DEV) for t in (qc, codes, scale, zero)]
    got = label_scores(*args, r=r, bits=bits, reduce=reduce, mult=0.25, backend="triton")
    ref = label_scores(*args, r=r, bits=bits, reduce=reduce, mult=0.25, backend="reference")
    deq = raw.double() * scale.double()[..., None] + zero.double()[..., None]  # [B, Hkv, n, r]
    full = torch.einsum("bkgr,bknr->bkgn", qc.double().view(B, Hkv, G, r), deq)
    want = {"max": full.amax(2), "mean": full.mean(2), "sum": full.sum(2), "none": full.flatten(1, 2)}[reduce] * 0.25
    for x in (got, ref):
        assert x.dtype == torch.float32 and x.shape == want.shape
        assert (x.cpu().double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_bad_input():
    q = torch.randn(1, 4, 8)
    lo = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="hi"):
        bound_scores(q, lo, torch.zeros(1, 2, 3, 9))
    with pytest.raises(ValueError, match="q heads"):
        bound_scores(torch.randn(1, 3, 8), lo, lo)
    with pytest.raises(ValueError, match="reduce"):
        bound_scores(q, lo, lo, reduce="min")
    with pytest.raises(ValueError, match="backend"):
        bound_scores(q, lo, lo, backend="cuda")
    codes = torch.zeros(1, 2, 3, 4, dtype=torch.uint8)
    s = torch.ones(1, 2, 3)
    with pytest.raises(ValueError, match="codes"):
        label_scores(torch.randn(1, 4, 8), codes.int(), s, s, r=8)
    with pytest.raises(ValueError, match="bits"):
        label_scores(torch.randn(1, 4, 8), codes, s, s, r=8, bits=2)
    with pytest.raises(ValueError, match="zero"):
        label_scores(torch.randn(1, 4, 8), codes, s, s[..., :2], r=8)
    with pytest.raises(ValueError, match="qc"):
        label_scores(torch.randn(1, 4, 7), codes, s, s, r=8)
