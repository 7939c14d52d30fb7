"""The typed SelectContext: named fields in and out, and the old string keys of ``extras`` kept
working (read and write the fields); ``extras`` holds free-form keys only."""
import dataclasses

import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext


def test_old_extras_keys_read_and_write_the_typed_fields():
    kl = torch.tensor([5, 3])
    ctx = SelectContext(layer=1, extras={"kv_lens": kl, "padding_side": "left", "mine": 7})
    assert ctx.kv_lens is kl and ctx.padding_side == "left"
    assert dict(ctx.extras) == {"kv_lens": kl, "padding_side": "left", "mine": 7}
    ctx.extras["phase"] = "decode"
    assert ctx.phase == "decode"
    ctx.label_bytes = 12
    assert ctx.extras["label_bytes"] == 12 and "label_bytes" in ctx.extras
    assert "v" not in ctx.extras and ctx.extras.get("q_pre_rope", "dflt") == "dflt"  # None = absent
    with pytest.raises(KeyError):
        ctx.extras["v"]
    del ctx.extras["kv_lens"]
    assert ctx.kv_lens is None and "kv_lens" not in ctx.extras
    assert ctx.extras["mine"] == 7 and ctx.extras._free == {"mine": 7}  # only free-form keys stored


def test_explicit_field_wins_and_replace_keeps_state():
    ctx = SelectContext(kv_lens=torch.tensor([4]), extras={"kv_lens": torch.tensor([9]), "x": 1})
    assert ctx.kv_lens.tolist() == [4]
    c2 = dataclasses.replace(ctx, layer=3)
    assert c2.layer == 3 and c2.kv_lens.tolist() == [4] and c2.extras["x"] == 1
    c2.extras["x"] = 2
    assert ctx.extras["x"] == 1  # the copy has its own mapping bound to itself
    with pytest.raises(ValueError, match="extras"):
        SelectContext(extras=[1, 2])


def test_methods_report_through_the_fields():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    ctx = SelectContext(layer=0, phase="decode", kv_lens=torch.tensor([250]))
    tp = get_method("streaming_llm", n_sink=4, window=16).select(q, k, ctx)
    assert int(tp.counts.max()) <= 20  # kv_lens read from the field: picks stay below 250
    assert int(tp.indices[tp.indices >= 0].max()) < 250
    ctx = SelectContext(layer=0)
    get_method("recycled_attention", budget=32).select(q, k, ctx)
    assert ctx.full_step is True and ctx.extras["full_step"] is True
