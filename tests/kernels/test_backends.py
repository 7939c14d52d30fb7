"""One backend table for every kernel family: the same CPU/interpreter rule, a reason for every
refusal (DEBUG), a WARNING the first time a requested backend falls back, and the estimate
kernel dispatched to Triton on CUDA and to its reference on a plain CPU."""
import logging
import types

import pytest
import torch

from sparsattn.kernels import backends as B
from sparsattn.kernels import estimate as E


def _fake_cuda():
    dev = torch.device("cuda", 7)
    B._CAP[dev] = 9  # a capability-9 GPU, without touching CUDA
    return types.SimpleNamespace(is_cuda=True, device=dev)


def test_same_rule_for_every_family(monkeypatch, caplog):
    cpu = torch.zeros(1)
    fam_default = {f: list(t)[-1] for f, t in B.TABLE.items()}
    for fam in B.TABLE:
        assert B.choose(fam, _fake_cuda()) == "triton", fam
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with caplog.at_level(logging.DEBUG, logger="sparsattn"):
        for fam in B.TABLE:
            assert B.choose(fam, cpu) == fam_default[fam], fam
    assert caplog.text.count("triton refused: device cpu") == len(B.TABLE)
    with pytest.raises(ValueError, match="backend: 'triton' cannot run these inputs: device cpu"):
        B.choose("attn_pool", cpu, "triton")
    with pytest.raises(ValueError, match="backend: expected one of"):
        B.choose("lightning", cpu, "reference")


def test_first_fallback_warns_once(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    B._WARNED.discard(("unit_scores", "triton"))
    with caplog.at_level(logging.DEBUG, logger="sparsattn"):
        for _ in range(2):
            assert B.choose("unit_scores", torch.zeros(1), "triton", fallback=True) == "reference"
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "falling back" in warns[0].getMessage()


def test_estimate_dispatch_cuda_cpu_and_interpreter(monkeypatch):
    assert B.choose("estimate", _fake_cuda(), q_len=40, kv_len=50) == "triton"
    assert B.choose("estimate", _fake_cuda(), q_len=60, kv_len=50) == "reference"
    assert B.choose("estimate", _fake_cuda(), probs=True) == "reference"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 37, 24, generator=g)
    k = torch.randn(1, 2, 53, 24, generator=g)
    ref = E.vertical_slash_scores(q, k, 9, backend="reference")
    if B.triton_can_run(q)[0]:  # the interpreter (tests set TRITON_INTERPRET=1): on request, same sums
        assert B.choose("estimate", q, q_len=37, kv_len=53) == "reference"
        tri = E.vertical_slash_scores(q, k, 9, backend="triton")
        for a, b in zip(tri, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert B.choose("estimate", q, q_len=37, kv_len=53) == "reference"
    out = E.vertical_slash_scores(q, k, 9)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
