"""Triton last-q vertical/slash estimate equals the torch reference (TRITON_INTERPRET=1 on CPU)."""
import os
import subprocess
import sys

import pytest
import torch

CODE = r"""
import torch
from sparsattn.kernels.estimate.reference import vertical_slash_scores
from sparsattn.kernels.estimate.triton import vertical_slash_scores_triton
g = torch.Generator().manual_seed(0)
for (B, Hq, Hkv, Tq, Tk, D, lq) in [(1, 4, 2, 100, 100, 16, 24), (2, 2, 1, 40, 130, 24, 64), (1, 2, 2, 70, 70, 32, 5)]:
    q = torch.randn(B, Hq, Tq, D, generator=g) * 2
    k = torch.randn(B, Hkv, Tk, D, generator=g) * 2
    v0, s0 = vertical_slash_scores(q, k, lq)
    v1, s1 = vertical_slash_scores_triton(q, k, lq, block_n=32)
    torch.testing.assert_close(v1, v0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s1, s0, atol=1e-4, rtol=1e-4)
print("OK")
"""


def test_triton_matches_reference_interpret():
    if torch.cuda.is_available():
        pytest.skip("checked on the GPU by the gpu-marked test")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
def test_triton_matches_reference_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    exec(CODE.replace("torch.randn(B, Hq, Tq, D, generator=g)", "torch.randn(B, Hq, Tq, D, generator=g).cuda()")
         .replace("torch.randn(B, Hkv, Tk, D, generator=g)", "torch.randn(B, Hkv, Tk, D, generator=g).cuda()"), {})
