"""Every Triton launch of the library fits a Hopper SM's shared memory (227 KB).

The launches of one call are captured (``smem_compile.capture_launches``: not run) and compiled for
``sm_90`` off-GPU; a launch asking for more than an H100 / H200 has fails there with
``OutOfResources``. Found on an H100 (2026-12-05): the block-sparse forward at head_dim 128 in bf16
asked for 425984 bytes whenever a length was not a multiple of the block (two software-pipelined
full-block loops, each with three stages of K and V tiles), so any prompt of such a length failed.
Head dims 64 / 128 / 256 (Llama-style models use 128), bf16 and float32, lengths that are not a
multiple of the block (the masked loads). Compiling is slow on a CPU (about 3 s a kernel).
"""
import pytest
import torch

import sparsattn as sa
from sparsattn import patterns as P
from sparsattn.kernels.attn_pool import attn_pool
from sparsattn.kernels.estimate import vertical_slash_scores
from sparsattn.kernels.lightning import lightning_attention
from sparsattn.kernels.sparse_decode import sparse_decode_attention
from sparsattn.kernels.sparse_decode.triton import sparse_decode_triton
from sparsattn.kernels.unit_scores import bound_scores, label_scores
from sparsattn.patterns import TokenPattern

from .smem_compile import capture_launches, nvidia_backend_available, over_budget, shared_memory

pytestmark = pytest.mark.skipif(not nvidia_backend_available(), reason="triton without its NVIDIA backend")
BF16, F32 = torch.bfloat16, torch.float32


def _rand(*shape, dtype=F32, device="cpu", grad=False):
    return torch.randn(*shape).to(device, dtype).requires_grad_(grad)


def _block_sparse(D, dt, kind, device):
    T = 200
    q, k, v = (_rand(1, 2, T, D, dtype=dt, device=device, grad=True) for _ in range(3))
    kw, pattern = {}, None
    if kind == "vslash":  # the column path (HAS_COLS)
        pattern = P.vertical_slash(T, torch.tensor([[[3, 77, T - 5]]], device=device),
                                   torch.tensor([[[0, 40]]], device=device), block_size=128)
    elif kind == "window":  # element tiles (HAS_BANK)
        pattern = P.sliding_window(T, 45, block_q=128, device=device)
    elif kind == "softcap_sinks":
        kw = dict(softcap=30.0, sinks=torch.zeros(2, device=device, requires_grad=True))

    def run():
        out = sa.attention(q, k, v, pattern, causal=pattern is None, backend="triton", **kw)
        out.float().square().sum().backward()
    return capture_launches(run, "block_sparse")


def _decode(D, dt, device):
    B, Hq, Hkv, T = 2, 8, 2, 300
    q = _rand(B, Hq, D, dtype=dt, device=device)
    k, v = (_rand(B, Hkv, T, D, dtype=dt, device=device) for _ in range(2))
    idx = torch.stack([torch.randperm(T)[:250].sort().values for _ in range(Hkv)])[None].expand(B, -1, -1)
    pat = TokenPattern(idx.to(torch.int32).contiguous().to(device), torch.full((B, Hkv), 250, dtype=torch.int32,
                                                                                device=device), T, 1)

    def run():
        for splits in (1, 4):  # direct and split-K (+ merge)
            sparse_decode_attention(q, k, v, pat, backend="triton", num_splits=splits, validate=False)
            sparse_decode_attention(q, k, v, None, backend="triton", num_splits=splits, softcap=20.0,
                                    sinks=torch.zeros(Hq, device=device))
        # split-K with the separate merge kernel (fused_merge=False)
        sparse_decode_triton(q, k, v, pat.indices, pat.counts, torch.full((B,), T, dtype=torch.int32, device=device),
                             scale=D ** -0.5, page_size=1, num_splits=4, fused_merge=False)
    return capture_launches(run, "sparse_decode")


def _others(D, dt, device):
    q, k = _rand(1, 4, 200, D, dtype=dt, device=device), _rand(1, 2, 200, D, dtype=dt, device=device)
    v = _rand(1, 4, 200, D, dtype=dt, device=device)
    decay = -torch.full((4,), 0.1, device=device)  # on q's device: the kernel refuses another (the H100 run's 3 failures)
    launches = capture_launches(lambda: lightning_attention(q, k.repeat_interleave(2, 1), v, decay, backend="triton"),
                                "lightning")
    launches += capture_launches(lambda: attn_pool(q, k), "attn_pool")
    launches += capture_launches(lambda: vertical_slash_scores(q, k, backend="triton"), "estimate")
    qd = _rand(2, 6, D, dtype=dt, device=device)
    lo, hi = (_rand(2, 2, 150, D, dtype=dt, device=device) for _ in range(2))
    codes = torch.randint(0, 256, (2, 2, 150, 8), dtype=torch.uint8, device=device)
    launches += capture_launches(lambda: (
        bound_scores(qd, torch.minimum(lo, hi), torch.maximum(lo, hi), backend="triton"),
        label_scores(_rand(2, 6, 16, device=device), codes, torch.rand(2, 2, 150).half().to(device),
                     torch.randn(2, 2, 150).half().to(device), r=16, bits=4, backend="triton")), "unit_scores")
    return launches


def _check(launches):
    sizes = shared_memory(launches)
    assert len(sizes) == len(launches)
    over = over_budget(launches, sizes)
    assert not over, f"launches over 227 KB of shared memory: {over}"


@pytest.mark.parametrize("D", (64, 128, 256))
def test_block_sparse_launches_fit(D, device):
    """The block-sparse forward and both backward kernels at this head_dim (bf16 and float32; at
    head_dim 128 in bf16 also columns, element tiles, softcap and sinks)."""
    launches = _block_sparse(D, BF16, "causal", device) + _block_sparse(D, F32, "causal", device)
    if D == 128:
        for kind in ("vslash", "window", "softcap_sinks"):
            launches += _block_sparse(D, BF16, kind, device)
    assert {n for _, n, _ in launches} == {"_bs_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkv_kernel"}
    _check(launches)


@pytest.mark.parametrize("D", (64, 128, 256))
def test_decode_and_scoring_launches_fit(D, device):
    """Sparse decode (direct and split-K with its merge; softcap and sinks) and the Lightning, pooled
    attention map, vertical-slash estimate and unit-score kernels at this head_dim, bf16."""
    launches = _decode(D, BF16, device) + _others(D, BF16, device)
    names = {n for _, n, _ in launches}
    assert {"_decode_kernel", "_merge_kernel", "_kernel()", "_lastq_lse_kernel", "_lastq_vs_kernel",
            "_bound_kernel", "_label_kernel"} <= names, names
    _check(launches)


def test_the_check_can_fail(device):
    """A launch known to exceed the budget (the bf16 head_dim-128 forward with seven pipeline stages
    of 128 x 128 K and V tiles) is reported above it: a compile that returned 0 would not pass."""
    launches = [x for x in _block_sparse(128, BF16, "causal", device) if x[1] == "_bs_fwd_kernel"]
    launches[0][2]["kw"]["num_stages"] = 7
    assert over_budget(launches, shared_memory(launches))
