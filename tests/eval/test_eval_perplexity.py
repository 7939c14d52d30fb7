"""Tests of sparsattn.eval.perplexity with a tiny random Llama and a uniform-logit model."""
from __future__ import annotations

import importlib
import math
import pathlib
from types import SimpleNamespace

import pytest
import torch

from sparsattn.eval import tasks as T

# the package exports the function ``perplexity``, which shadows the submodule as an attribute
P = importlib.import_module("sparsattn.eval.perplexity")


class ZeroLogits(torch.nn.Module):
    """Outputs all-zero logits: every token has probability 1/V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) * self.dummy)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_uniform_logits_give_vocab_size():
    ids = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    res = P.perplexity(ZeroLogits(50), ids, lengths=(16, 100), batch_size=3, progress=False)
    for L, r in res.items():
        assert r.ppl == pytest.approx(50.0, rel=1e-5)
        assert r.nll == pytest.approx(math.log(50), rel=1e-6)
        assert r.n_windows == 1000 // L and r.n_tokens == r.n_windows * (L - 1)


def test_tiny_llama_matches_manual(tiny_llama):
    ids = torch.randint(0, 97, (600,), generator=torch.Generator().manual_seed(1))
    res = P.perplexity(tiny_llama, ids[None], lengths=(32, 128), batch_size=2, progress=False)
    for L in (32, 128):
        n = 600 // L
        win = ids[: n * L].view(n, L)
        with torch.no_grad():
            logits = tiny_llama(win).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), win[:, 1:].reshape(-1))
        assert res[L].nll == pytest.approx(float(nll), rel=1e-5)
        assert res[L].ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
        assert 1.0 < res[L].ppl < 1e4
    # batch size does not change the result; max_windows limits the windows
    res1 = P.perplexity(tiny_llama, ids, lengths=(32,), batch_size=1, max_windows=4, progress=False)
    assert res1[32].n_windows == 4
    win = ids[:128].view(4, 32)
    with torch.no_grad():
        logits = tiny_llama(win).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), win[:, 1:].reshape(-1))
    assert res1[32].nll == pytest.approx(float(nll), rel=1e-5)
    assert res1[32].to_row(model="tiny")["model"] == "tiny"


def test_chunked_cross_entropy_equals_full():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 300, 40, generator=g).to(torch.bfloat16)
    tgt = torch.randint(0, 40, (2, 300), generator=g)
    full = float(torch.nn.functional.cross_entropy(logits.float().reshape(-1, 40), tgt.reshape(-1),
                                                   reduction="sum"))
    assert P._nll_sum(logits, tgt, rows_per_chunk=7) == pytest.approx(full, rel=1e-6)


def test_errors(tiny_llama):
    ids = torch.arange(100) % 97
    with pytest.raises(ValueError, match="lengths"):
        P.perplexity(tiny_llama, ids, lengths=(200,), progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        P.perplexity(tiny_llama, ids.float(), lengths=(10,), progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        P.perplexity(tiny_llama, ids.view(2, 50), lengths=(10,), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        P.perplexity(tiny_llama, ids, lengths=(10,), batch_size=0, progress=False)

    class Bad(torch.nn.Module):
        def forward(self, x):
            return SimpleNamespace(logits=torch.zeros(x.shape[0], 3))

    with pytest.raises(ValueError, match="logits"):
        P.perplexity(Bad(), ids, lengths=(10,), progress=False)


def test_heldout_token_stream(monkeypatch, bpe_tok, hf_tok):
    import json
    files = tuple(sorted(pathlib.Path(json.__file__).parent.glob("*.py")))
    monkeypatch.setattr(T._base, "_heldout_files", lambda: files)
    a = P.heldout_token_stream(bpe_tok, 3000, seed=0)
    b = P.heldout_token_stream(bpe_tok, 3000, seed=0)
    assert a.shape == (3000,) and a.dtype == torch.long and torch.equal(a, b)
    others = [P.heldout_token_stream(bpe_tok, 3000, seed=s) for s in range(1, 6)]
    assert any(not torch.equal(a, c) for c in others)  # the seed picks the file order
    # the stream decodes back to the text of the seeded first file(s), no BOS inserted
    text = bpe_tok.decode(a[:200].tolist())
    assert "<s>" not in text and any(text in f.read_text() for f in files)
    # with an HF tokenizer the files are separated by its eos id
    h = P.heldout_token_stream(hf_tok, 20000, seed=0)
    assert int((h == hf_tok.eos_token_id).sum()) >= 1 and int((h == hf_tok.bos_token_id).sum()) == 0
    with pytest.raises(ValueError, match="n_tokens"):
        P.heldout_token_stream(bpe_tok, 10 ** 9, seed=0)
