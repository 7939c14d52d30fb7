"""patch / unpatch / patched on tiny models of each family: exactness, round trips, bad input."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from hf_testutil import FAMILIES, causal_keep, eager_logits, layer_windows, left_padded, make_model

from sparsattn.integrations import hf


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_patch_matches_unpatched_with_left_padding(family):
    """Dense method: logits of valid positions equal the unpatched (eager) model's, per family,
    including GQA and the families' sliding-window layers (window 24 < 80 tokens)."""
    model = make_model(family)
    ids, am, pos = left_padded(2, 80, [0, 23])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
        hf.patch(model, "dense")
        assert model.config._attn_implementation == hf.NAME
        out = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=2e-5)
    # a patched model differs from one with windows removed (so the windows really were applied)
    if any(w is not None for w in layer_windows(model).values()):
        with torch.no_grad():
            no_win = eager_logits(make_model(family), ids, {l: causal_keep(80, am) for l in range(4)}, pos)
        assert (no_win[valid] - out[valid]).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_patch_unpatch_round_trip(impl):
    model = make_model("llama", attn_implementation=impl)
    ids = torch.randint(0, 128, (2, 50))
    with torch.no_grad():
        before = model(ids).logits
        hf.patch(model, "dense")
        assert hf.is_patched(model)
        hf.patch(model, {0: "dense", "default": "dense"}, block_size=16)  # re-patch keeps the original
        hf.unpatch(model)
        assert model.config._attn_implementation == impl
        assert model.config.__dict__["_attn_implementation_internal"] == impl
        assert not hf.is_patched(model)
        assert all(not hasattr(m, "_sparsattn_layer") for m in model.modules())
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    hf.unpatch(model)  # unpatching twice is harmless


def test_context_manager_restores_on_exception():
    model = make_model("qwen2", attn_implementation="sdpa")
    with pytest.raises(RuntimeError, match="boom"):
        with hf.patched(model, "dense"):
            assert model.config._attn_implementation == hf.NAME
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not hf.is_patched(model)
    with hf.patched(model, "dense") as m:
        assert m.model is model and hf.is_patched(model)  # the PatchReport of the run
    assert model.config._attn_implementation == "sdpa"


def test_no_patching_at_import():
    from transformers import AttentionInterface  # noqa: F401

    model = make_model("llama", attn_implementation="sdpa")
    import sparsattn.integrations.hf  # noqa: F401

    assert model.config._attn_implementation == "sdpa"


def test_unknown_method_lists_valid_names():
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"unknown method 'no_such_method'.*valid methods: .*dense"):
        hf.patch(model, "no_such_method")
    assert not hf.is_patched(model)


def test_bad_specs():
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"unknown layer index\(es\) \[7\]"):
        hf.patch(model, {7: "dense"})
    with pytest.raises(ValueError, match=r"hyper-parameter\(s\) \['not_a_field'\]"):
        hf.patch(model, "dense", not_a_field=3)
    with pytest.raises(ValueError, match=r"head index\(es\) \[9\] out of range"):
        hf.patch(model, {"default": {9: "dense"}})
    with pytest.raises(ValueError, match="expected decode-phase methods"):
        hf.patch(model, "dense", decode="dense")
    with pytest.raises(ValueError, match="model: expected a torch.nn.Module"):
        hf.patch("not a model")
    assert model.config._attn_implementation == "eager"


def test_unsupported_family_names_what_is_missing():
    import transformers as tf

    cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128)
    model = tf.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(ValueError, match=r"GPT2Attention.*missing config.num_key_value_heads"):
        hf.patch(model, "dense")
    with pytest.raises(ValueError, match="no attention module"):
        hf.patch(torch.nn.Linear(3, 3), "dense")


def test_context_longer_than_trained_length_warns_once_per_call():
    model = make_model("llama", max_position_embeddings=64)
    hf.patch(model, "dense")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(torch.randint(0, 128, (1, 80)))
    msgs = [w for w in rec if "max_position_embeddings=64" in str(w.message)]
    assert len(msgs) == 1
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(torch.randint(0, 128, (1, 40)))
    assert not [w for w in rec if "max_position_embeddings" in str(w.message)]


def test_unexpressible_mask_falls_back_to_dense_with_debug_log(caplog):
    """Packed sequences (position ids restarting, no padding mask): transformers builds a block-diagonal
    mask the kernels cannot express -> dense SDPA with the 4-D mask, logged at DEBUG, still exact."""
    model = make_model("llama")
    ids = torch.randint(0, 128, (1, 60))
    pos = torch.cat([torch.arange(25), torch.arange(35)])[None]
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        hf.patch(model, "dense")
        with caplog.at_level(logging.DEBUG, logger="sparsattn.integrations.hf"):
            out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert any("fallback" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    # and the ordinary causal path does not fall back
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="sparsattn.integrations.hf"):
        model(input_ids=ids)
    assert not any("fallback" in r.getMessage() for r in caplog.records)


def test_right_padding_prefill_matches():
    model = make_model("mistral")
    ids = torch.randint(0, 128, (2, 70))
    am = torch.ones(2, 70, dtype=torch.long)
    am[1, 50:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).logits
        hf.patch(model, "dense")
        out = model(input_ids=ids, attention_mask=am).logits
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=2e-5)


def test_exports():
    for name in ("patch", "unpatch", "patched", "SparseCache"):
        assert hasattr(hf, name) and name in hf.__all__


def test_nested_patched_restores_previous_patch():
    model = make_model("llama")
    ids = torch.randint(0, 128, (1, 40))
    from sparsattn import patterns
    from sparsattn.methods import Method

    class Win(Method):
        name = "test_win4"

        def select(self, q, k, ctx=None):
            return patterns.sliding_window(q.shape[2], 4, k.shape[2], block_q=16, device=q.device)

    with torch.no_grad():
        dense = model(ids).logits
        hf.patch(model, Win())
        win = model(ids).logits
        with hf.patched(model, "dense"):
            torch.testing.assert_close(model(ids).logits, dense, rtol=1e-4, atol=2e-5)
        assert hf.is_patched(model)
        torch.testing.assert_close(model(ids).logits, win, rtol=0, atol=0)
        hf.unpatch(model)
        assert model.config._attn_implementation == "eager"
    assert (win - dense).abs().max() > 1e-3
