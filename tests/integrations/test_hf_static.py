"""Static caches and compiled generation on a patched model (issue 16.2): ``generate(...,
cache_implementation="static" | "sliding_window")`` equals dynamic-cache generation for prefill and
decode methods, and the compiled decode step has no graph break."""
from __future__ import annotations

import pytest
import torch

from sparsattn.integrations import hf

from hf_testutil import cache_kwarg, make_model

GEN = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)


def _gen(model, x, **kw):
    out = model.generate(x, **GEN, **kw)
    return out.sequences, torch.stack(out.scores, 1)


def _tiny(family="llama", **over):
    m = make_model(family, attn_implementation="sdpa", **over)
    m.generation_config.pad_token_id = 0
    return m


@pytest.mark.parametrize("family,impl", [("llama", "static"), ("mistral", "static"), ("mistral", "sliding_window")])
def test_static_cache_matches_dynamic_prefill_method(family, impl):
    # mistral: a 24-token window, shorter than the 40-token prompt (the static sliding layer rolls)
    m = _tiny(family, num_hidden_layers=2)
    x = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(1))
    dense_seq, dense_scores = _gen(m, x)
    hf.patch(m, method="a_shape", n_init=4, n_local=8)
    seq, scores = _gen(m, x)
    s_seq, s_scores = _gen(m, x, cache_implementation=impl)
    assert torch.equal(s_seq, seq)
    torch.testing.assert_close(s_scores, scores, atol=2e-5, rtol=2e-5)
    # the sparse prefill ran (a_shape keeps 12 of up to 40 keys): the first logits differ from dense
    assert (scores[:, 0] - dense_scores[:, 0]).abs().max() > 1e-3


def test_static_cache_gemma2_softcap_and_hybrid_layers():
    """Gemma 2: alternating sliding / full layers (a dict of masks from generate) and logit softcapping
    (the static decode step's dense path applies it: a cap of 0.05 changes every score)."""
    m = make_model("gemma2", attn_implementation="eager", num_hidden_layers=2, attn_logit_softcapping=0.05)
    m.generation_config.pad_token_id = 0
    x = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(9))
    hf.patch(m, method="a_shape", n_init=4, n_local=8)
    seq, scores = _gen(m, x)
    s_seq, s_scores = _gen(m, x, cache_implementation="static")
    assert torch.equal(s_seq, seq)
    torch.testing.assert_close(s_scores, scores, atol=2e-5, rtol=2e-5)


def test_static_cache_left_padded_batch():
    m = _tiny("llama", num_hidden_layers=2)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(3, 120, (2, 36), generator=g)
    am = torch.ones_like(x)
    am[1, :9] = 0
    x[1, :9] = 0
    hf.patch(m, method="a_shape", n_init=4, n_local=8)
    seq, scores = _gen(m, x, attention_mask=am)
    s_seq, s_scores = _gen(m, x, attention_mask=am, cache_implementation="static")
    assert torch.equal(s_seq, seq)
    torch.testing.assert_close(s_scores, scores, atol=2e-5, rtol=2e-5)


def test_static_cache_decode_method_and_state():
    m = _tiny("llama", num_hidden_layers=2)
    x = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(3))
    dense_seq, dense_scores = _gen(m, x)
    hf.patch(m, decode="streaming_llm", n_sink=2, window=6)
    seq, scores = _gen(m, x)
    s_seq, s_scores = _gen(m, x, cache_implementation="static")
    assert torch.equal(s_seq, seq)
    torch.testing.assert_close(s_scores, scores, atol=2e-5, rtol=2e-5)
    assert (scores[:, 1:] - dense_scores[:, 1:]).abs().max() > 1e-3  # decode steps read 8 of 41+ tokens


def test_cross_step_state_lives_on_the_cache():
    """A decode method's ``ctx.state`` persists across the steps of one cache (any transformers cache,
    not only SparseCache) and starts over on an empty cache."""
    from transformers import StaticCache

    from sparsattn.integrations.hf.patch import _STATE_ATTR

    m = _tiny("llama", num_hidden_layers=2)
    hf.patch(m, decode="recycled_attention", budget=8, stride=3)
    x = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(4))
    cache = StaticCache(config=m.config, max_cache_len=64)
    ck = cache_kwarg(m)
    m.generate(x, **{ck: cache}, max_new_tokens=3, do_sample=False)
    st = cache.__dict__[_STATE_ATTR]
    assert set(st["recycled_attention"]) == {0, 1} and st["recycled_attention"][0]["since"] == 1
    cache.reset()  # a forward on an empty cache starts a new state (generate resets a reused static cache)
    with torch.no_grad():
        m(x[:, :5], **{ck: cache})
    assert cache.__dict__[_STATE_ATTR] is not st and not cache.__dict__[_STATE_ATTR]


def test_compiled_static_generation_has_no_graph_break():
    """generate with a static cache and a compiled forward (fullgraph=True: any graph break raises)."""
    from transformers import CompileConfig
    from torch._dynamo.utils import counters

    m = _tiny("llama", num_hidden_layers=2)
    x = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(5))
    hf.patch(m, method="a_shape", n_init=4, n_local=8)
    ref, ref_scores = _gen(m, x, cache_implementation="static")
    torch._dynamo.reset()
    counters.clear()
    cc = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    cc._compile_all_devices = True  # transformers compiles only on accelerators unless told
    seq, scores = _gen(m, x, cache_implementation="static", compile_config=cc)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step really was compiled
    assert not counters["graph_break"]
    assert torch.equal(seq, ref)
    torch.testing.assert_close(scores, ref_scores, atol=2e-5, rtol=2e-5)


def test_compiled_decode_method_has_no_graph_break():
    """A decode method in the compiled step of a static cache: fullgraph=True (no graph break) and the
    tokens of the eager static-cache run."""
    from transformers import CompileConfig
    from torch._dynamo.utils import counters

    m = _tiny("llama", num_hidden_layers=2)
    x = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(6))
    hf.patch(m, decode="streaming_llm", n_sink=2, window=6)
    ref, ref_scores = _gen(m, x, cache_implementation="static")
    torch._dynamo.reset()
    counters.clear()
    cc = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    cc._compile_all_devices = True
    seq, scores = _gen(m, x, cache_implementation="static", compile_config=cc)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert torch.equal(seq, ref)
    torch.testing.assert_close(scores, ref_scores, atol=2e-5, rtol=2e-5)


def test_compiled_decode_path_with_left_padding(monkeypatch):
    """The sync-free decode-method path (taken under torch.compile), run eagerly on a left-padded batch
    with a sliding window: the tokens and scores of dynamic-cache generation."""
    import sparsattn.integrations.hf.forward as fwd

    m = _tiny("mistral", num_hidden_layers=2)  # 24-token window
    g = torch.Generator().manual_seed(7)
    x = torch.randint(3, 120, (2, 36), generator=g)
    am = torch.ones_like(x)
    am[0, :7] = 0
    x[0, :7] = 0
    hf.patch(m, decode="streaming_llm", n_sink=2, window=6)
    seq, scores = _gen(m, x, attention_mask=am)
    monkeypatch.setattr(fwd, "_compiling", lambda: True)
    s_seq, s_scores = _gen(m, x, attention_mask=am, cache_implementation="static")
    assert torch.equal(s_seq, seq)
    torch.testing.assert_close(s_scores, scores, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_inductor_compiled_static_generation():
    """The same with the inductor backend (what transformers uses by default): code generation on the
    CPU takes about a minute, hence slow."""
    from transformers import CompileConfig

    m = _tiny("llama", num_hidden_layers=1)
    x = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(8))
    hf.patch(m, method="a_shape", n_init=4, n_local=8)
    ref, ref_scores = _gen(m, x, cache_implementation="static")
    torch._dynamo.reset()
    cc = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    cc._compile_all_devices = True
    seq, scores = _gen(m, x, cache_implementation="static", compile_config=cc)
    assert torch.equal(seq, ref)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
