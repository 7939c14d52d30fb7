"""Bad input to the public attention API raises ValueError naming the argument and what was
expected; backend choice explains refusals."""
import logging
import os

import pytest
import torch

import sparsattn as sa
from sparsattn import patterns as P


#: Triton runs on CPU tensors here (the interpreter); on a CUDA machine the kernel tests cover it
_CPU_TRITON = os.environ.get("TRITON_INTERPRET") == "1"


def _qkv(B=1, Hq=4, Hkv=2, T=64, D=32, dt=torch.float32):
    return torch.randn(B, Hq, T, D, dtype=dt), torch.randn(B, Hkv, T, D, dtype=dt), torch.randn(B, Hkv, T, D, dtype=dt)


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q[0], k, v), r"q: expected a 4-D tensor"),
    (lambda q, k, v: (q, k[:, :1].expand(1, 3, 64, 32), v[:, :1].expand(1, 3, 64, 32)), "k heads"),
    (lambda q, k, v: (q, k[..., :16], v), "k head_dim"),
    (lambda q, k, v: (q, k.half(), v), "k/v dtype"),
    (lambda q, k, v: (q.long(), k, v), r"q.dtype"),
    (lambda q, k, v: (q, k, v[:, :, :10]), "v:"),
    (lambda q, k, v: (q, k.to("meta"), v), "k/v device"),
    (lambda q, k, v: (q, torch.cat([k, k]), v), "k/v batch"),
])
def test_bad_tensors(change, match):
    q, k, v = change(*_qkv())
    with pytest.raises(ValueError, match=match):
        sa.attention(q, k, v, backend="reference")


def test_bad_pattern_and_options():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="pattern: expected q_len=64"):
        sa.attention(q, k, v, P.causal(128, block_q=32))
    with pytest.raises(ValueError, match="pattern heads"):
        sa.attention(q, k, v, P.causal(64, block_q=32, heads=3))
    with pytest.raises(ValueError, match="pattern: expected a sparsattn.patterns.BlockPattern"):
        sa.attention(q, k, v, "causal")
    with pytest.raises(ValueError, match="causal"):
        sa.attention(q, k, v, P.dense(64, block_q=32), causal=True)
    with pytest.raises(ValueError, match="scale"):
        sa.attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="q_lens"):
        sa.attention(q, k, v, q_lens=torch.tensor([-3]))
    with pytest.raises(ValueError, match="kv_lens"):
        sa.attention(q, k, v, kv_lens=torch.tensor([65]))
    with pytest.raises(ValueError, match="padding_side"):
        sa.attention(q, k, v, q_lens=torch.tensor([3]), padding_side="middle")
    with pytest.raises(ValueError, match="backend"):
        sa.attention(q, k, v, backend="cudnn")
    p = P.causal(64, block_q=32)
    p.kv_indices[0, 0, 1, 0] = 5  # out of range
    with pytest.raises(ValueError, match="kv_indices"):
        sa.attention(q, k, v, p)


def test_varlen_bad_input():
    q = torch.randn(4, 100, 32)
    k = torch.randn(2, 100, 32)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        sa.attention_varlen(q, k, k, torch.tensor([0, 50, 90]))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        sa.attention_varlen(q, k, k, torch.tensor([0, 60, 50, 100]))
    with pytest.raises(ValueError, match="q: expected a 3-D tensor"):
        sa.attention_varlen(q[None], k, k, torch.tensor([0, 100]))


def test_backend_refusal_is_explained(caplog):
    q, k, v = _qkv()
    with caplog.at_level(logging.DEBUG, logger="sparsattn"):
        name = sa.choose_backend(q, None)
    assert name in ("triton", "reference")
    if name == "reference":
        assert "triton refused" in caplog.text
    p = P.vertical_slash(64, torch.tensor([[[3]]]), torch.tensor([[[0]]]), block_size=32)
    with pytest.raises(ValueError, match="flex"):
        sa.attention(q, k, v, p, backend="flex")


def test_dense_default_equals_sdpa():
    q, k, v = _qkv(B=2, Hq=4, Hkv=4, T=77, D=48)
    out = sa.attention(q, k, v, causal=True, backend="reference")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - ref).abs().max() < 1e-5


# ---- issue 10: patterns changed in place, scale types and ranges, varlen inputs ----------------


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("inference", [False, True], ids=["grad-mode", "inference-mode"])
def test_pattern_changed_in_place_after_use_is_validated_again(backend, inference):
    """Validation was cached per pattern object: after ``kv_indices.fill_(50)`` the Triton kernel read
    out of range (NaN, no error). Inference-mode tensors keep no version counter."""
    if backend == "triton" and not _CPU_TRITON:
        pytest.skip("Triton on CPU tensors needs the interpreter (set by tests/conftest.py without CUDA)")
    q, k, v = _qkv()
    ctx = torch.inference_mode() if inference else torch.enable_grad()
    with ctx:
        p = P.causal(64, block_q=32)
        sa.attention(q, k, v, p, backend=backend)
        p.kv_indices.fill_(50)
        with pytest.raises(ValueError, match="kv_indices"):
            sa.attention(q, k, v, p, backend=backend)
        p2 = P.causal(64, block_q=32)
        sa.attention(q, k, v, p2, backend=backend)
        p2.full_kv_num_blocks.fill_(7)
        with pytest.raises(ValueError, match="full_kv_num_blocks"):
            sa.attention(q, k, v, p2, backend=backend)


def test_valid_in_place_change_refreshes_cached_lists():
    """A pattern changed in place into another valid pattern computes the new one, forward and
    backward (the transposed lists and bank copies are rebuilt, not reused)."""
    if not _CPU_TRITON:
        pytest.skip("Triton on CPU tensors needs the interpreter (set by tests/conftest.py without CUDA)")
    q, k, v = _qkv()
    m = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    p = P.from_block_mask(m, block_size=32, q_len=64)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    sa.attention(*x, p, backend="triton").sum().backward()
    p.full_kv_num_blocks[0, 0, 0] = 1  # query block 0: only key block 0 now
    fresh = P.from_block_mask(torch.tensor([[[[True, False], [True, True]]]]), block_size=32, q_len=64)
    for pat in (p, fresh):
        y = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sa.attention(*y, pat, backend="triton")
        out.sum().backward()
        if pat is p:
            got = (out.detach(), [t.grad for t in y])
        else:
            want = (out.detach(), [t.grad for t in y])
    assert (got[0] - want[0]).abs().max() < 1e-5
    for a, b in zip(got[1], want[1]):
        assert (a - b).abs().max() < 1e-5


def test_scale_types_and_ranges():
    import numpy as np

    q, k, v = _qkv()
    ref = sa.attention(q, k, v, scale=0.125, backend="reference")
    for s in (np.float32(0.125), np.float64(0.125), torch.tensor(0.125), np.array(0.125)):
        assert torch.equal(sa.attention(q, k, v, scale=s, backend="reference"), ref), type(s)
    for s, shown in ((1e37, "1e+37"), (float("nan"), "nan"), (float("inf"), "inf"), (0.0, "0.0"), (-1, "-1"),
                     (True, "True"), ("0.1", "'0.1'"), (torch.tensor([0.1, 0.2]), "shape")):
        with pytest.raises(ValueError, match="scale") as e:
            sa.attention(q, k, v, scale=s, backend="reference")
        assert shown in str(e.value), (s, str(e.value))
    with pytest.raises(ValueError, match="scale"):
        sa.attention_varlen(q[0], k[0], v[0], [0, 64], scale=1e37)
    from sparsattn.kernels.sparse_decode import sparse_decode_attention

    assert not torch.isnan(sparse_decode_attention(q[:, :, 0], k, v, scale=np.float32(0.125))).any()
    with pytest.raises(ValueError, match="scale"):
        sparse_decode_attention(q[:, :, 0], k, v, scale=1e37)


def test_varlen_bool_cu_seqlens_and_pattern_checks():
    q = torch.randn(4, 100, 32)
    k = torch.randn(2, 100, 32)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected a 1-D integer tensor"):
        sa.attention_varlen(q, k, k, torch.tensor([False, True]))
    with pytest.raises(ValueError, match="cu_seqlens_k: expected a 1-D integer tensor"):
        sa.attention_varlen(q, k, k, [0, 100], torch.tensor([0.0, 100.0]))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        sa.attention_varlen(q, k, k, "0,100")
    p = P.causal(100, block_q=32)
    p.kv_indices[0, 0, 1, 0] = 9  # out of range: the varlen path never validated the pattern
    with pytest.raises(ValueError, match="kv_indices"):
        sa.attention_varlen(q, k, k, [0, 100], pattern=p)
    with pytest.raises(ValueError, match="pattern heads"):
        sa.attention_varlen(q, k, k, [0, 100], pattern=P.causal(100, block_q=32, heads=3))
    with pytest.raises(ValueError, match="pattern: expected a sparsattn.patterns.BlockPattern"):
        sa.attention_varlen(q, k, k, [0, 100], pattern="causal", causal=True)
