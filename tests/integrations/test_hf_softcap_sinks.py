"""Gemma 2 logit soft-capping and gpt-oss learned sinks through the patched HF attention.

Tiny random models (2 layers, a sliding-window layer and a full one): a method that keeps every
causal pair gives eager attention's logits (and, for gpt-oss, the sinks' gradient), at prefill and at
decode; sparse methods run. The cap and the sinks are set large enough to change the logits.
"""
from __future__ import annotations

import os

import pytest
import torch
from hf_testutil import cache_kwarg, make_model

from sparsattn.integrations import hf

T = 28
KEEP_ALL = dict(n_init=4, n_local=T - 4, block_size=16)  # a_shape keeping every causal pair of T tokens


def _sharpen(model):
    """Scores of a few units (the random init gives ~1e-3, where neither a cap nor a sink matters)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def _gemma2(cap=2.0):
    return _sharpen(make_model("gemma2", num_hidden_layers=2, sliding_window=12, attn_logit_softcapping=cap,
                               layer_types=["sliding_attention", "full_attention"]))


def _gpt_oss():
    import transformers as tf

    if not hasattr(tf, "GptOssForCausalLM"):
        pytest.skip("transformers has no gpt-oss model")
    torch.manual_seed(0)
    cfg = tf.GptOssConfig(num_hidden_layers=2, num_local_experts=2, num_experts_per_tok=1, vocab_size=128,
                          hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
                          num_key_value_heads=2, sliding_window=12, max_position_embeddings=256,
                          layer_types=["sliding_attention", "full_attention"])
    cfg._attn_implementation = "eager"
    model = _sharpen(tf.GptOssForCausalLM(cfg).eval())
    with torch.no_grad():
        for layer in model.model.layers:  # sinks that matter (the init is N(0, 0.02))
            layer.self_attn.sinks.copy_(torch.randn(4) * 2 + 1)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_keep_all_method_equals_eager(family):
    model = _gemma2() if family == "gemma2" else _gpt_oss()
    ids = torch.randint(0, 128, (2, T))
    ref = _logits(model, ids)
    if family == "gemma2":  # the cap changes the logits at this scale
        assert (_logits(_gemma2(cap=None), ids) - ref).abs().max() > 1e-3
    else:
        with torch.no_grad():
            saved = [l.self_attn.sinks.clone() for l in model.model.layers]
            for l in model.model.layers:
                l.self_attn.sinks.fill_(-1e4)
            assert (_logits(model, ids) - ref).abs().max() > 1e-3
            for l, s in zip(model.model.layers, saved):
                l.self_attn.sinks.copy_(s)
    with hf.patched(model, "a_shape", **KEEP_ALL):
        out = _logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_gpt_oss_through_the_triton_kernel(interpret):
    """The same equality with the Triton block-sparse kernel (the interpreter on a CPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors through Triton need the interpreter (set by tests/conftest.py without CUDA)")
    model = _gpt_oss()
    ids = torch.randint(0, 128, (1, T))
    ref = _logits(model, ids)
    with hf.patched(model, "a_shape", backend="triton", **KEEP_ALL):
        out = _logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_gpt_oss_sink_gradient_equals_eager():
    """The model trains its sinks: their gradient through the patched attention equals eager's."""
    model = _gpt_oss()
    ids = torch.randint(0, 128, (1, T))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [l.self_attn.sinks.grad.clone() for l in model.model.layers]

    ref = grads()
    with hf.patched(model, "a_shape", **KEEP_ALL):
        got = grads()
    for a, b in zip(got, ref):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_decode_equals_eager_and_sparse_methods_run(family):
    """Prefill then two decode steps through the cache: a keep-all decode method equals eager (the
    sparse decode kernel with cap / sinks); sparse prefill and decode methods give finite logits."""
    model = _gemma2() if family == "gemma2" else _gpt_oss()
    ck = cache_kwarg(model)
    ids = torch.randint(0, 128, (1, T))
    steps = torch.randint(0, 128, (1, 2))

    def run():
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, logits = out.past_key_values, [out.logits[:, -1]]
            for i in range(steps.shape[1]):
                out = model(steps[:, i:i + 1], use_cache=True, **{ck: cache})
                cache = out.past_key_values
                logits.append(out.logits[:, -1])
        return torch.stack(logits)

    ref = run()
    with hf.patched(model, "a_shape", decode="quest", token_budget=4096, page_size=4, dense_layers=0, **KEEP_ALL):
        got = run()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with hf.patched(model, "a_shape", decode="quest", n_init=4, n_local=8, block_size=16, token_budget=8,
                    page_size=4, dense_layers=0):
        sparse = run()
    assert torch.isfinite(sparse).all()
    assert (sparse - ref).abs().max() > 1e-4  # really sparse
