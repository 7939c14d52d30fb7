"""Bad input to the public attention API raises ValueError naming the argument and what was
expected; backend choice explains refusals."""
import logging

import pytest
import torch

import sparsattn as sa
from sparsattn import patterns as P


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
