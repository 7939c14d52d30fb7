"""Tokenizer: byte-level BPE for the bundled model, trained offline with HF ``tokenizers``.

Byte-level BPE (the GPT-2 scheme, "Language Models are Unsupervised Multitask Learners") with one
change that matters for retrieval: every digit is its own pre-token
(``Digits(individual_digits=True)``), so a 7-digit pass key is always 7 single-digit tokens and
copying it is a plain token-by-token copy. A space before a number is then its own token, so the
tokenization of ``prompt + " 1234567"`` is the tokenization of ``prompt`` followed by the answer's.

Special tokens: ``<s>`` (BOS, prepended by the post-processor, like Llama), ``</s>`` (EOS, document
separator when packing) and ``<pad>``. Saved as a ``PreTrainedTokenizerFast`` (``tokenizer.json`` +
``tokenizer_config.json``) so ``AutoTokenizer.from_pretrained(path)`` loads it offline.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


def _raw_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2,
                    max_token_length: int = 24):
    """train_tokenizer: byte-level BPE with single-digit pre-tokens (GPT-2 BPE, Radford et al. 2019).

    Args:
        texts: training text (an iterable of documents).
        vocab_size: final vocabulary size including the 256 byte symbols and 3 special tokens.
        min_frequency: a pair must occur this often to be merged.
        max_token_length: longest merged token in characters (keeps runs like ``======`` out).
    Returns:
        ``transformers.PreTrainedTokenizerFast`` with ``<s>`` prepended on encode
        (``add_special_tokens=True``), ``</s>`` as EOS and ``<pad>`` as padding.
    Raises:
        ValueError: ``vocab_size`` too small for the byte alphabet plus special tokens.
    """
    from tokenizers import pre_tokenizers, processors, trainers

    if vocab_size < 512:
        raise ValueError(f"vocab_size: expected >= 512 (256 bytes + merges), got {vocab_size}")
    tok = _raw_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length)
    tok.train_from_iterator(iter(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return wrap_tokenizer(tok)


def wrap_tokenizer(raw):
    """wrap_tokenizer: a ``tokenizers.Tokenizer`` as ``PreTrainedTokenizerFast`` with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    for t in SPECIAL_TOKENS:
        if raw.token_to_id(t) is None:
            raise ValueError(f"raw: tokenizer lacks the special token {t!r}")
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 20, clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, path: str | os.PathLike) -> list[Path]:
    """save_tokenizer: write ``tokenizer.json`` and ``tokenizer_config.json`` (HF format) under ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    files = [path / "tokenizer.json", path / "tokenizer_config.json"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(f"save_tokenizer: save_pretrained did not write {missing}")
    return files


def load_tokenizer(path: str | os.PathLike):
    """load_tokenizer: ``AutoTokenizer.from_pretrained(path)`` offline (local files only)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"path: expected a folder with tokenizer.json, got {str(path)!r}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def sample_texts(paths: list, max_bytes: int, *, seed: int = 0) -> Iterator[str]:
    """sample_texts: text of a deterministic random subset of ``paths``, about ``max_bytes`` in all."""
    import random

    from ..data import read_source_text

    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    total = 0
    for i in order:
        if total >= max_bytes:
            break
        text = read_source_text(paths[i])
        total += len(text)
        yield text
