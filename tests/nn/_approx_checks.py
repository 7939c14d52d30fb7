"""Shared checks of the approximation mixer tests (hyper, scatterbrain, sea, combiner); not a test
module."""
from __future__ import annotations

import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.kernels.merge import merge_lse
from sparsattn.nn.mixers._approx_common import exact_lse


def qkv(B=1, H=2, T=96, D=16, dtype=torch.float64, scale=1.0, seed=0):
    """Random q, k, v ``[B, H, T, D]``."""
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(3))


def assert_lse_merges_with_extra_keys(core, q, k, v, *, causal=True, atol=1e-8):
    """The core's ``(out, lse)`` merged by lse with exact attention on extra keys (a disjoint key set,
    e.g. a memory) equals exact attention on both key sets: its lse is the true log-normaliser."""
    g = torch.Generator().manual_seed(5)
    ke = torch.randn(q.shape[0], q.shape[1], 7, q.shape[-1], generator=g, dtype=q.dtype)
    ve = torch.randn(q.shape[0], q.shape[1], 7, v.shape[-1], generator=g, dtype=v.dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = merge_lse([core(q, k, v), exact_lse(q, ke, ve, scale=scale, causal=False)])
    T = q.shape[2]
    keep = torch.ones(T, 7 + T, dtype=torch.bool)
    if causal:
        keep[:, 7:] = torch.ones(T, T, dtype=torch.bool).tril()
    ref, lref = dense_reference(q, torch.cat([ke, k], 2), torch.cat([ve, v], 2), mask=keep[None, None])
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    torch.testing.assert_close(lse.double(), lref, atol=atol, rtol=atol)


def future_change(layer, T=64, t=20, dim=32, seed=0) -> float:
    """Largest change of the outputs at positions ``<= t`` when the inputs after ``t`` change (0 for
    a causal layer); the global RNG is re-seeded before both calls."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, dim, generator=g)
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn(2, T - t - 1, dim, generator=g) * 3
    with torch.no_grad():
        torch.manual_seed(1)
        y1 = layer(x)
        torch.manual_seed(1)
        y2 = layer(x2)
    return float((y1[:, :t + 1] - y2[:, :t + 1]).abs().max())


def bf16_long_finite(core, T=2048, D=32, H=2, scale=6.0):
    """The core on bf16 inputs of large magnitude over a long sequence: finite output and lse."""
    q, k, v = qkv(1, H, T, D, dtype=torch.bfloat16, scale=scale, seed=3)
    out, lse = core(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.isfinite(lse).all()
    return out, lse
