"""The bundled model: loads offline from the package and answers a 2K passkey densely, also when
patched with the dense method (the integration changes nothing)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsattn.models import bundled_path

    path = bundled_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tok


def _answer(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_bundled_model_answers_2k_passkey(bundled):
    from sparsattn.eval.scoring import string_match_all
    from sparsattn.eval.tasks import passkey

    model, tok = bundled
    assert sum(p.numel() for p in model.parameters()) <= 25_000_000
    assert model.config.max_position_embeddings >= 16384
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    s = passkey(tok, 2048, 0.4, seed=7)
    assert s.answers[0] in s.prompt
    pred = _answer(model, tok, s.prompt)
    assert string_match_all(pred, s.answers) == 1.0, (pred, s.answers)


def test_bundled_model_dense_patch_generates_the_same(bundled):
    import sparsattn
    from sparsattn.eval.tasks import passkey

    model, tok = bundled
    s = passkey(tok, 1024, 0.8, seed=11)
    plain = _answer(model, tok, s.prompt)
    with sparsattn.patched(model, method="dense", backend="reference"):
        patched = _answer(model, tok, s.prompt)
    assert patched == plain
    assert s.answers[0] in plain
