"""Shared fixtures of the eval tests: tokenizer stand-ins (byte-level, whitespace, a small trained BPE) and the
bundled model with its tokenizer."""
from __future__ import annotations

import pytest


class ByteTokenizer:
    """One token per UTF-8 byte."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class WhitespaceTokenizer:
    """One token per whitespace-separated word (ids from a hash, stable)."""

    def encode(self, text: str) -> list[int]:
        return [sum(map(ord, w)) % 1000 for w in text.split()]


def _training_text() -> str:
    from sparsattn.eval import tasks, _words
    parts = [" ".join(tasks.NOISE_SENTENCES) * 3, tasks.NEEDLE_TEMPLATE, tasks.QUESTION_TEMPLATE,
             tasks.PREAMBLE, tasks.VT_PREAMBLE, tasks.CWE_PREAMBLE, " ".join(_words.SINGLE_WORDS),
             "VAR ABCDE = 12345 VAR FGHIJ = VAR ABCDE 0123456789",
             "def f(x):\n    return x + 1\n\nclass A:\n    pass\n"]
    return "\n".join(parts)


@pytest.fixture(scope="session")
def byte_tok():
    return ByteTokenizer()


@pytest.fixture(scope="session")
def ws_tok():
    return WhitespaceTokenizer()


@pytest.fixture(scope="session")
def bpe_tok():
    """A byte-level BPE (``tokenizers``) trained on a few KB of text, with a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_training_text()], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


@pytest.fixture(scope="session")
def hf_tok(bpe_tok):
    """The same BPE wrapped as a ``transformers`` fast tokenizer (BOS added by default)."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=bpe_tok, bos_token="<s>", eos_token="</s>",
                                   model_max_length=512)


@pytest.fixture(scope="module")
def bundled():
    from sparsattn.evaluate import load_model
    from sparsattn.models import BundledModelMissing

    try:
        model, tok, _ = load_model()
    except BundledModelMissing as e:  # pragma: no cover - the package ships the checkpoint
        pytest.skip(str(e))
    return model, tok
