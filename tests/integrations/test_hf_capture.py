"""capture_qkv: q/k/v captured from a tiny model reproduce its attention layers' outputs; and the
bundled model (when present) gives identical logits with the dense method patched."""
from __future__ import annotations

import pytest
import torch
from hf_testutil import left_padded, make_model

from sparsattn.capture import capture_qkv
from sparsattn.integrations import hf
from sparsattn.kernels.block_sparse.reference import dense_reference


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_captured_qkv_reproduce_attention_output(family):
    model = make_model(family, attn_implementation="sdpa")
    ids, am, pos = left_padded(2, 60, [0, 9])
    outs = {}
    handles = [layer.self_attn.register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o[0].detach()))
               for l, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    cap = capture_qkv(model, ids, [1, 2], attention_mask=am)
    for h in handles:
        h.remove()
    assert sorted(cap) == [1, 2]
    assert model.config._attn_implementation == "sdpa"
    for l, (q, k, v) in cap.items():
        attn = model.model.layers[l].self_attn
        assert q.shape == (2, 4, 60, 16) and k.shape == (2, 2, 60, 16) and v.shape == k.shape
        w = getattr(attn, "sliding_window", None)
        i = torch.arange(60)[:, None]
        j = torch.arange(60)[None, :]
        keep = (j <= i) & ((i - j < w) if w is not None else True)
        keep = keep[None, None] & am.bool()[:, None, None, :]
        o, _ = dense_reference(q, k, v, scale=attn.scaling, mask=keep)
        y = attn.o_proj(o.float().transpose(1, 2).reshape(2, 60, -1))
        valid = am.bool()
        torch.testing.assert_close(y[valid], outs[l][valid], rtol=1e-4, atol=2e-5)
    # the capture forward did not change the model
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    torch.testing.assert_close(again, ref_logits, rtol=0, atol=0)


def test_capture_on_patched_model_keeps_patch_and_checks_input():
    model = make_model("llama")
    hf.patch(model, "dense")
    cap = capture_qkv(model, torch.randint(0, 128, (1, 20)))
    assert sorted(cap) == [0, 1, 2, 3]
    assert model.config._attn_implementation == hf.NAME and hf.is_patched(model)
    with pytest.raises(ValueError, match=r"layers: unknown layer index\(es\) \[9\]"):
        capture_qkv(model, torch.randint(0, 128, (1, 20)), [9])
    with pytest.raises(ValueError, match="input_ids: expected an integer tensor"):
        capture_qkv(model, torch.randn(1, 20))
    with pytest.raises(ValueError, match="attention_mask: expected a"):
        capture_qkv(model, torch.randint(0, 128, (1, 20)), attention_mask=torch.ones(1, 5))


def _bundled():
    try:
        from sparsattn.models import bundled_path
    except ImportError as e:
        pytest.skip(f"sparsattn.models.bundled_path is not available yet ({e})")
    import os

    try:
        path = bundled_path()
    except Exception as e:  # noqa: BLE001 - absent model raises in some versions
        pytest.skip(f"bundled model is absent ({e})")
    if path is None or not os.path.exists(str(path)):
        pytest.skip(f"bundled model is absent (bundled_path() = {path})")
    return path


def test_bundled_model_dense_patch_equals_unpatched():
    path = _bundled()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager",
                                                 torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 96), generator=g)
    am = torch.ones_like(ids)
    am[1, :20] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).logits
        with hf.patched(model, "dense"):
            out = model(input_ids=ids, attention_mask=am).logits
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=1e-4)
