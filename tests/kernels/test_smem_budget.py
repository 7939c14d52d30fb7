"""Every block-sparse launch configuration fits a Hopper SM's shared memory (227 KB).

The launches of one forward + backward are captured (``smem_compile.capture_launches``) and
compiled for ``sm_90`` off-GPU; a launch asking for more than an H100 / H200 has fails on the GPU
with ``OutOfResources``. Found on an H100 (2026-12-05): the forward at head_dim 128 in bf16 asked
for 425984 bytes whenever the length was not a multiple of the block (two software-pipelined
full-block loops, each with three stages of K and V tiles), so any prompt of such a length failed.
Compiling is slow on a CPU (about 3 s a kernel): 27 launches in three tests.
"""
import os

import pytest
import torch

import sparsattn as sa
from sparsattn import patterns as P

from .smem_compile import HOPPER_SMEM, capture_launches, nvidia_backend_available, shared_memory

pytestmark = pytest.mark.skipif(not nvidia_backend_available(), reason="triton without its NVIDIA backend")


def _launches(D, dtype, T, kind="causal", device="cpu"):
    g = torch.Generator().manual_seed(D + T)
    q, k, v = (torch.randn(1, 2, T, D, generator=g).to(dtype).to(device).requires_grad_(True) for _ in range(3))
    kw = {}
    pattern = None
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

    caps = capture_launches(run)
    return [(name, caps[name]) for name in sorted(caps)]


CASES = [(D, dt, T, "causal") for D in (64, 128, 256) for dt in (torch.bfloat16, torch.float32) for T in (200,)]
# lengths that are not a multiple of the block: the masked loads (the failing case on the H100)
CASES += [(128, torch.bfloat16, 200, "vslash"),
          (128, torch.bfloat16, 200, "window"), (128, torch.bfloat16, 200, "softcap_sinks")]


@pytest.mark.parametrize("D", (64, 128, 256))
def test_launches_fit_hopper_shared_memory(D, device):
    """Default launch configurations of the forward and both backward kernels, for every case of
    this head_dim, ask for at most 227 KB of shared memory when compiled for sm_90."""
    cases = [c for c in CASES if c[0] == D]
    launches, ids = [], []
    for D_, dt, T, kind in cases:
        for name, cap in _launches(D_, dt, T, kind, device):
            launches.append((name, cap))
            ids.append(f"{name} D={D_} {str(dt)[6:]} T={T} {kind}")
    sizes = shared_memory(launches)
    if os.environ.get("SPARSATTN_PRINT_SMEM"):
        for i, s in zip(ids, sizes):
            print(f"{i}: {s}")
    over = [(i, s) for i, s in zip(ids, sizes) if s > HOPPER_SMEM]
    assert not over, f"launches over {HOPPER_SMEM} bytes of shared memory: {over}"
