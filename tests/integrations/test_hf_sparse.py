"""Sparse static patterns through the HF integration equal eager attention with the equivalent 4-D
masks: all layers, per layer, per head, with left padding and the families' own sliding windows."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hf_testutil import causal_keep, eager_logits, layer_windows, left_padded, make_model

from sparsattn import patterns
from sparsattn.integrations import hf
from sparsattn.methods import Method


@dataclass
class Window(Method):
    """Test method (not registered): a causal sliding window of ``window`` keys."""

    name = "test_window"
    paper = "test"
    phase = "prefill"
    window: int = 10
    block_size: int = 16

    def select(self, q, k, ctx=None):
        return patterns.sliding_window(q.shape[2], self.window, k.shape[2], block_q=self.block_size, device=q.device)


@dataclass
class RecordingWindow(Window):
    """Window that records the contexts it was given."""

    def __post_init__(self):
        self.seen = []

    def select(self, q, k, ctx=None):
        self.seen.append((ctx.layer, ctx.scale, ctx.q_offset, tuple(q.shape), tuple(k.shape), dict(ctx.extras), id(ctx.state)))
        return super().select(q, k, ctx)


def _both(keep_a, keep_b):
    return keep_a & keep_b


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_window_method_equals_eager_with_4d_mask(family):
    """Every layer with a 10-token window (sequences 90, left padding 0/17): patched logits equal
    eager attention with the 4-D mask causal & window & padding (& the layer's own window)."""
    model = make_model(family)
    T = 90
    ids, am, pos = left_padded(2, T, [0, 17])
    wins = layer_windows(model)
    masks = {}
    for l in range(4):
        keep = causal_keep(T, am, window=10)
        if wins[l] is not None:
            keep = keep & causal_keep(T, am, window=wins[l])
        masks[l] = keep
    ref = eager_logits(model, ids, masks, pos)
    hf.patch(model, Window(window=10))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=2e-5)


def test_per_layer_methods_dense_first_layers():
    model = make_model("qwen2")  # layers 2, 3 have the model's own 24-token window
    T = 100
    ids, am, pos = left_padded(2, T, [5, 0])
    wins = layer_windows(model)
    spec = {0: "dense", 1: "dense", "default": Window(window=12)}
    masks = {}
    for l in range(4):
        keep = causal_keep(T, am, window=wins[l])
        if l >= 2:
            keep = keep & causal_keep(T, am, window=12)
        masks[l] = keep
    ref = eager_logits(model, ids, masks, pos)
    hf.patch(model, spec)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=2e-5)
    # the dense-everywhere result is measurably different (the windows matter)
    hf.patch(model, "dense")
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    assert (dense[valid] - out[valid]).abs().max() > 1e-3


def test_per_head_composition_equals_per_head_masks():
    """heads={1: window 8, 3: window 20} over dense: head h of every layer gets its own mask."""
    model = make_model("llama")
    T = 80
    ids, am, pos = left_padded(2, T, [0, 9])
    keep = causal_keep(T, am).expand(2, 4, T, T).clone()
    keep[:, 1] &= causal_keep(T, am, window=8)[:, 0]
    keep[:, 3] &= causal_keep(T, am, window=20)[:, 0]
    ref = eager_logits(model, ids, {l: keep for l in range(4)}, pos)
    hf.patch(model, "dense", heads={1: Window(window=8), 3: Window(window=20)}, block_size=16)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=2e-5)


def test_per_head_mapping_in_method_spec_and_block_size_mismatch():
    model = make_model("llama")
    ids = torch.randint(0, 128, (1, 40))
    hf.patch(model, {0: {0: Window(window=5), "default": Window(window=30)}, "default": "dense"}, block_size=16)
    with torch.no_grad():
        model(ids)
    # dense with its default 128-token blocks vs a 16-token-block window: a clear error
    hf.patch(model, "dense", heads={2: Window(window=8)})
    with pytest.raises(ValueError, match="different block sizes"):
        with torch.no_grad():
            model(ids)


def test_select_context_contents():
    """The method sees the layer index, module scaling, right-aligned q/k with lengths, and one shared
    state dict per forward."""
    model = make_model("llama")
    rec = RecordingWindow(window=16)
    hf.patch(model, rec)
    ids, am, pos = left_padded(2, 64, [0, 10])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, position_ids=pos)
    assert [s[0] for s in rec.seen] == [0, 1, 2, 3]
    scale = model.model.layers[0].self_attn.scaling
    assert all(abs(s[1] - scale) < 1e-12 for s in rec.seen)
    layer, _, q_off, qs, ks, extras, sid = rec.seen[0]
    assert q_off == 0 and qs == (2, 4, 64, 16) and ks == (2, 2, 64, 16)
    assert extras["phase"] == "prefill" and extras["padding_side"] == "left"
    assert extras["kv_lens"].tolist() == [64, 54] and extras["q_lens"].tolist() == [64, 54]
    assert len({s[6] for s in rec.seen}) == 1  # one state dict for the forward's layers
    rec.seen.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, position_ids=pos)
    assert len({s[6] for s in rec.seen}) == 1 and rec.seen[0][6] != sid  # a fresh one for the next forward


def test_left_padding_rolls_q_k_for_select():
    """q/k given to select are right-aligned: row 0 of sequence b is its first real token."""
    model = make_model("llama")
    captured = {}

    @dataclass
    class Grab(Window):
        def select(self, q, k, ctx=None):
            captured.setdefault(ctx.layer, (q.clone(), k.clone(), ctx.extras["kv_lens"].clone()))
            return super().select(q, k, ctx)

    ids, am, pos = left_padded(2, 48, [0, 11])
    from sparsattn.capture import capture_qkv

    raw = capture_qkv(model, ids, [0], attention_mask=am)[0]
    hf.patch(model, Grab(window=48))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, position_ids=None)
    q, k, lens = captured[0]
    torch.testing.assert_close(q[1, :, :37], raw[0][1, :, 11:])
    torch.testing.assert_close(k[1, :, :37], raw[1][1, :, 11:])
    assert bool((q[1, :, 37:] == 0).all()) and lens.tolist() == [48, 37]
    torch.testing.assert_close(q[0], raw[0][0])


def test_pre_rope_hook():
    model = make_model("llama")
    got = {}

    @dataclass
    class PreRope(Window):
        needs_pre_rope = True

        def select(self, q, k, ctx=None):
            got[ctx.layer] = (ctx.extras["q_pre_rope"], ctx.extras["k_pre_rope"], q)
            return super().select(q, k, ctx)

    hf.patch(model, PreRope(window=64))
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        model(ids)
    qp, kp, q = got[1]
    assert qp.shape == (1, 4, 30, 16) and kp.shape == (1, 2, 30, 16)
    # position 0 has no rotation: pre- and post-RoPE agree there, and differ later
    torch.testing.assert_close(qp[:, :, 0], q[:, :, 0])
    assert (qp[:, :, 5:] - q[:, :, 5:]).abs().max() > 1e-4
    hf.unpatch(model)
    assert not model.model.layers[0].self_attn.q_proj._forward_hooks


def test_triton_kernels_end_to_end(interpret):
    """The same window check through the Triton kernels (the interpreter on the CPU)."""
    if not interpret:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py on the CPU)")
    model = make_model("llama", num_hidden_layers=2)
    T = 40
    ids, am, pos = left_padded(2, T, [0, 7])
    ref = eager_logits(model, ids, {l: causal_keep(T, am, window=10) for l in range(2)}, pos)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernels on a GPU
    model.to(dev)
    hf.patch(model, Window(window=10), backend="triton")
    with torch.no_grad():
        out = model(input_ids=ids.to(dev), attention_mask=am.to(dev), position_ids=pos.to(dev)).logits.cpu()
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="backend: expected"):
        hf.patch(model, "dense", backend="cuda")


def test_longheads_gets_values_at_prefill():
    """LongHeads' default chunk keys need the values: the integration passes them in ctx.extras."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import sparsattn

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 200))
    with torch.no_grad():
        ref = model(ids).logits
        with sparsattn.patched(model, method="longheads", backend="reference", window_size=32, atten_length=512,
                               block_size=32):
            out = model(ids).logits  # atten_length covers the context: equal to dense
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
