"""The ``hyper`` prefill method: a method that computes attention itself (``Method.attend``), patched
into a tiny Llama through the HF integration; equal to dense at full budget, approximate otherwise."""
from __future__ import annotations

import pytest
import torch

import sparsattn
from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext


def _qkv(B=1, Hq=4, Hkv=2, T=160, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


def test_registered_as_an_attending_prefill_method():
    m = get_method("hyper")
    assert "hyper" in sparsattn.list_methods("prefill")
    assert m.computes_output and m.select(*_qkv()[:2]) is None
    assert not get_method("dense").computes_output
    assert (m.block_size, m.sample_size, m.min_seq_len, m.lsh_num_projs) == (256, 256, 4096, 7)


def test_attend_full_budget_is_exact_gqa_and_lse():
    q, k, v = _qkv(T=157)
    ref, lref = dense_reference(q, k, v, causal=True)
    for cfg in ({}, {"min_seq_len": 16, "block_size": 157}):
        out, lse = get_method("hyper", **cfg).attend(q, k, v, SelectContext(layer=0))
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), lref, atol=1e-5, rtol=1e-5)


def test_attend_approximates_and_is_deterministic():
    q, k, v = _qkv(T=256)
    m = get_method("hyper", min_seq_len=32, block_size=16, sample_size=16)
    st: dict = {}
    o1, _ = m.attend(q, k, v, SelectContext(layer=3), stats=st)
    o2, _ = m.attend(q, k, v, SelectContext(layer=3))
    assert torch.equal(o1, o2)
    assert torch.isfinite(o1).all()
    ref, _ = dense_reference(q, k, v, causal=True)
    assert not torch.allclose(o1.double(), ref, atol=1e-3)
    assert 0 < st["pairs"] < 4 * 256 * 257 / 2  # fewer q-k pairs than exact causal attention


def test_chunked_prefill_is_exact():
    q, k, v = _qkv(T=100)
    out, _ = get_method("hyper", min_seq_len=16, block_size=8).attend(q[:, :, -30:], k, v, SelectContext())
    ref, _ = dense_reference(q[:, :, -30:], k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_bad_config_names_field():
    for name in ("block_size", "min_seq_len", "lsh_num_projs", "seed"):
        with pytest.raises(ValueError, match=name):
            get_method("hyper", **{name: -1})
    with pytest.raises(ValueError, match="sample_size"):
        get_method("hyper", sample_size=-1)


def test_patched_llama_equals_dense_at_full_budget_and_runs_approximate(hf_util):
    from sparsattn.integrations import hf

    model = hf_util.make_model("llama", attn_implementation="sdpa")
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        with hf.patched(model, method={2: "hyper", 3: "hyper"}, backend="reference", min_seq_len=4096):
            full = model(ids).logits
        with hf.patched(model, method={3: get_method("hyper", min_seq_len=16, block_size=8, sample_size=8)},
                        backend="reference"):
            approx = model(ids).logits
            gen = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(full, ref, atol=2e-4, rtol=1e-4)
    assert torch.isfinite(approx).all() and not torch.allclose(approx, ref, atol=1e-4)
    assert gen.shape == (1, 99)
