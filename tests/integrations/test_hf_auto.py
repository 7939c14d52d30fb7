"""from_pretrained(path, attn_implementation="sparsattn") with the methods read from config.sparsattn
(issue 16.2): a model saved after patching reloads sparse, with the same logits."""
from __future__ import annotations

import json

import pytest
import torch

from sparsattn.integrations import hf
from sparsattn.integrations.hf import auto

from hf_testutil import make_model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _reload(path):
    from transformers import AutoModelForCausalLM

    auto.register()
    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sparsattn").eval()


@pytest.mark.parametrize("spec", [
    dict(method="vertical_slash", v_size=8, s_size=16, last_q=16, n_local=8, n_sink=2, block_size=16,
         decode="streaming_llm", window=8),
    dict(method={0: "a_shape", "default": {1: "dense", "default": "a_shape"}}, n_init=4, n_local=8, block_size=16),
])
def test_save_and_reload_sparse(tmp_path, spec):
    model = make_model("llama", attn_implementation="sdpa")
    x = torch.randint(3, 120, (1, 70), generator=torch.Generator().manual_seed(0))
    dense = _logits(model, x)
    hf.patch(model, **spec)
    ref = _logits(model, x)
    assert (ref - dense).abs().max() > 1e-3  # the patch is really sparse
    entry = auto.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["sparsattn"] == entry
    back = _reload(tmp_path)
    assert back.config._attn_implementation == hf.NAME and not hf.is_patched(back)
    got = _logits(back, x)  # binds at the first forward
    assert hf.is_patched(back)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if "decode" in spec:  # the decode method came back too: same greedy continuation, also when
        # generate is the first call (the model binds inside its first forward, which has a cache)
        model.generation_config.pad_token_id = 0
        kw = dict(max_new_tokens=4, do_sample=False)
        want = model.generate(x, **kw)
        fresh = _reload(tmp_path)
        fresh.generation_config.pad_token_id = 0
        assert torch.equal(fresh.generate(x, **kw), want)
        assert torch.equal(back.generate(x, **kw), want)
        assert not getattr(fresh, "_sparsattn_patch").frames  # no frame left behind
    hf.unpatch(back)  # restores SDPA, not "sparsattn" (which would bind again)
    assert back.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(back, x), dense, atol=1e-5, rtol=1e-5)


def test_hand_written_entry_and_errors(tmp_path):
    model = make_model("llama", attn_implementation="sdpa")
    x = torch.randint(3, 120, (1, 50), generator=torch.Generator().manual_seed(1))
    model.config.sparsattn = {"method": {"name": "a_shape", "config": {"n_init": 4, "n_local": 8}}}
    model.save_pretrained(str(tmp_path))
    back = _reload(tmp_path)
    got = _logits(back, x)
    with hf.patched(model, "a_shape", n_init=4, n_local=8):
        torch.testing.assert_close(got, _logits(model, x), atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match=r"config.sparsattn.method: .*unknown method"):
        auto.patch_kwargs({"method": "no_such_method"})
    with pytest.raises(ValueError, match=r"config.sparsattn: expected only the keys"):
        auto.patch_kwargs({"method": "a_shape", "layers": 3})
    with pytest.raises(ValueError, match=r"config.sparsattn.method: expected layer/head indices"):
        auto.patch_kwargs({"method": {"x": "a_shape"}})
    bare = make_model("llama", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="config.sparsattn: missing"):
        auto.bind(bare)
    with pytest.raises(ValueError, match="model: not patched"):
        auto.config_entry(bare)


def test_calibrated_method_saved_next_to_the_weights(tmp_path):
    """A calibrated method (MInference's offline pattern search, shipped for the bundled model): its
    calibration is written under the saved folder and read back from there."""
    from sparsattn.methods import get_method
    from sparsattn.models import BundledModelMissing, bundled_path, load_bundled

    try:
        model, _ = load_bundled(dtype=torch.float32)
        cal = bundled_path() / "calibration" / "minference.json"
    except BundledModelMissing as e:
        pytest.skip(str(e))
    x = torch.randint(3, 8000, (1, 200), generator=torch.Generator().manual_seed(2))
    hf.patch(model, method=get_method("minference", path=str(cal)))
    ref = _logits(model, x)
    entry = auto.save_pretrained(model, tmp_path)
    rel = entry["method"]["config"]["path"]
    assert not rel.startswith("/") and (tmp_path / rel).is_file()
    back = _reload(tmp_path)
    torch.testing.assert_close(_logits(back, x), ref, atol=1e-5, rtol=1e-5)
