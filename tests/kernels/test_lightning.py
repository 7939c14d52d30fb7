"""Lightning attention: the Triton kernel (CPU interpreter) and the chunked torch form against the
quadratic masked-decay form and the step recurrence (float64), gradients of the chunked backward,
bf16 on a long sequence without NaN, clear errors."""
import pytest
import torch

from sparsattn.kernels.lightning import (can_run, lightning_attention, lightning_attention_triton, lightning_chunked,
                                         lightning_quadratic, lightning_recurrent)

from .conftest_helpers import rel


#: where the Triton kernel runs in these tests: CUDA when present, else the CPU interpreter
KDEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, T, D, E, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, T, E, generator=g, dtype=dtype)
    log_decay = -torch.tensor([0.0, 0.05, 0.7, 3.0][:H], dtype=torch.float32)
    return tuple(t.to(device) for t in (q, k, v, log_decay))


def _naive_loops(q, k, v, log_decay, scale):
    """The definition, with explicit loops over t and s (float64)."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    lam = torch.exp(log_decay.double())
    for t in range(T):
        for s in range(t + 1):
            w = (q[:, :, t] * k[:, :, s]).sum(-1) * scale * lam[None] ** (t - s)
            out[:, :, t] += w[..., None] * v[:, :, s]
    return out


@pytest.mark.parametrize("T,chunk", [(1, 16), (23, 8), (37, 16), (64, 64)])
def test_reference_forms_agree(T, chunk):
    q, k, v, g = _inputs(2, 4, T, 12, 7)
    naive = _naive_loops(q, k, v, g, 12 ** -0.5)
    quad = lightning_quadratic(q, k, v, g)
    rec, state = lightning_recurrent(q, k, v, g)
    ch = lightning_chunked(q, k, v, g, chunk=chunk)
    for o in (quad, rec, ch):
        assert o.dtype == torch.float64 and o.shape == (2, 4, T, 7)
        torch.testing.assert_close(o, naive, atol=1e-10, rtol=1e-10)
    assert state.shape == (2, 4, 12, 7)


def test_recurrence_carries_state():
    """Two halves through the recurrence with the carried state equal one pass."""
    q, k, v, g = _inputs(1, 3, 30, 8, 5)
    full, s_full = lightning_recurrent(q, k, v, g)
    a, s = lightning_recurrent(q[:, :, :11], k[:, :, :11], v[:, :, :11], g)
    b, s2 = lightning_recurrent(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], g, state=s)
    torch.testing.assert_close(torch.cat([a, b], 2), full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(s2, s_full, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,D,E,block", [(37, 24, 20, 16), (5, 16, 40, 16), (70, 33, 17, 32)])
def test_triton_forward_backward(dtype, T, D, E, block):
    """Kernel output and its chunked backward (three reversed/forward launches) vs the quadratic
    form in float64 (the kernel accumulates in float32: tolerance 1e-5 relative)."""
    assert can_run(torch.empty(1, device=KDEV))[0], "tests run on CUDA, or with TRITON_INTERPRET=1 on the CPU"
    if dtype == torch.float64 and KDEV == "cuda":
        pytest.skip("the kernel takes float64 in the interpreter only (on CUDA it refuses it with a ValueError)")
    q, k, v, g = _inputs(2, 3, T, D, E, device=KDEV)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = lightning_quadratic(*ref_in, g, scale=0.3)
    do = torch.randn_like(ref)
    ref.backward(do)
    xs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = lightning_attention_triton(*xs, g, scale=0.3, block=block)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.backward(do.to(dtype))
    assert rel(out, ref) < 1e-5
    for a, b, name in zip(xs, ref_in, "qkv"):
        assert rel(a.grad, b.grad) < 1e-5, name


def test_bf16_long_sequence_no_nan():
    """bf16, 4096 tokens, a decay close to 1 and one far below: finite, and within bf16 error of the
    float32 chunked form (every decay factor is exp of a non-positive number)."""
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(1, 2, 4096, 32, generator=g) * 3).bfloat16().to(KDEV)
    k = (torch.randn(1, 2, 4096, 32, generator=g) * 3).bfloat16().to(KDEV)
    v = torch.randn(1, 2, 4096, 32, generator=g).bfloat16().to(KDEV)
    log_decay = torch.tensor([-1e-4, -5.0], device=KDEV)
    ref = lightning_chunked(q.float(), k.float(), v.float(), log_decay)
    for out in (lightning_attention_triton(q, k, v, log_decay), lightning_chunked(q, k, v, log_decay)):
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert rel(out, ref) < 2e-2


def test_dispatch_and_errors():
    q, k, v, g = _inputs(1, 2, 9, 8, 8, dtype=torch.float32, device=KDEV)
    torch.testing.assert_close(lightning_attention(q, k, v, g), lightning_quadratic(q, k, v, g), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lightning_attention(q, k, v, g, backend="torch"), lightning_quadratic(q, k, v, g))
    torch.testing.assert_close(lightning_attention(q, k, v, g, backend="triton", block=16),
                               lightning_quadratic(q, k, v, g), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="log_decay"):
        lightning_attention(q, k, v, torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="log_decay"):
        lightning_attention(q, k, v, torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="^k"):
        lightning_attention(q, k[..., :4], v, g)
    with pytest.raises(ValueError, match="^v"):
        lightning_attention(q, k, v[:, :, :3], g)
    with pytest.raises(ValueError, match="block"):
        lightning_attention_triton(q, k, v, g, block=24)
    with pytest.raises(ValueError, match="backend"):
        lightning_attention(q, k, v, g, backend="cuda")
    with pytest.raises(ValueError, match="chunk"):
        lightning_chunked(q, k, v, g, chunk=0)
    with pytest.raises(ValueError, match="state"):
        lightning_recurrent(q, k, v, g, state=torch.zeros(1, 2, 3, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matches_fla_simple_gla_on_gpu():
    """Where fla-core is installed: our kernel equals fla's chunk_simple_gla with g_gamma = log_decay
    (the same operator; fla's layout is [B, T, H, D])."""
    fla = pytest.importorskip("fla.ops.simple_gla")
    q, k, v, g = _inputs(2, 4, 1000, 64, 64, dtype=torch.float32)
    q, k, v, g = (t.cuda() for t in (q, k, v, g))
    ours = lightning_attention_triton(q, k, v, g, scale=0.125)
    theirs, _ = fla.chunk_simple_gla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g_gamma=g, scale=0.125)
    assert rel(ours, theirs.transpose(1, 2)) < 1e-2
