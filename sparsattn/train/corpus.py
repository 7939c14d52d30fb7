"""train.corpus: the packed code corpus for training the bundled model and its token helpers.

``Corpus``: the train-split Python files of this installation (``sparsattn.data.source_files``),
tokenized in parallel (``encode_batch_fast``) into one token stream ``<s> doc </s> <s> doc ...``; a
training sequence is a random window of it (documents packed, EOS-separated). The loss groups of a
target token (``GROUP_*``) and the deterministic seeding of batches live here too.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

GROUP_IGNORE, GROUP_LM, GROUP_ANSWER = 0, 1, 2


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def encode_many(raw, texts: Sequence[str]) -> list[list[int]]:
    """encode_many: ids of each text (no special tokens) with a ``tokenizers.Tokenizer``."""
    if not texts:
        return []
    fn = getattr(raw, "encode_batch_fast", None) or raw.encode_batch
    return [e.ids for e in fn(list(texts), add_special_tokens=False)]


def raw_tokenizer(tokenizer):
    """raw_tokenizer: the ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or itself)."""
    for attr in ("backend_tokenizer", "_tokenizer"):
        raw = getattr(tokenizer, attr, None)
        if raw is not None and hasattr(raw, "encode_batch"):
            return raw
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer
    raise ValueError(f"tokenizer: expected a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")


@dataclass
class Corpus:
    """Corpus: one packed token stream ``<s> doc </s> <s> doc </s> ...`` (uint16 when the vocab fits).

    Attributes:
        tokens: 1-D integer array.
        n_docs, n_bytes: documents and UTF-8 characters tokenized.
    """
    tokens: np.ndarray
    n_docs: int = 0
    n_bytes: int = 0

    @classmethod
    def build(cls, raw, paths: Sequence[Path], *, bos_id: int, eos_id: int, max_bytes: int | None = None,
              seed: int = 0, chunk: int = 512) -> "Corpus":
        """build: tokenize files (deterministic shuffled order, capped at ``max_bytes`` characters)."""
        from ..data import read_source_text

        if not paths:
            raise ValueError("paths: expected at least one file")
        order = list(range(len(paths)))
        random.Random(seed).shuffle(order)
        dtype = np.uint16 if raw.get_vocab_size() <= 65535 else np.int32
        parts: list[np.ndarray] = []
        n_docs = n_bytes = 0
        batch: list[str] = []

        def flush():
            for ids in encode_many(raw, batch):
                arr = np.empty(len(ids) + 2, dtype=dtype)
                arr[0], arr[-1] = bos_id, eos_id
                arr[1:-1] = ids
                parts.append(arr)
            batch.clear()

        for i in order:
            if max_bytes is not None and n_bytes >= max_bytes:
                break
            text = read_source_text(paths[i])
            if not text.strip():
                continue
            batch.append(text)
            n_docs += 1
            n_bytes += len(text)
            if len(batch) >= chunk:
                flush()
        flush()
        if not parts:
            raise ValueError("paths: no non-empty file")
        return cls(np.concatenate(parts), n_docs=n_docs, n_bytes=n_bytes)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def window(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """window: ``n`` consecutive tokens at a uniformly random start (int32)."""
        if n <= 0:
            return np.zeros(0, dtype=np.int32)
        if n > len(self):
            raise ValueError(f"n: window of {n} tokens is longer than the corpus ({len(self)} tokens)")
        start = int(rng.integers(0, len(self) - n + 1))
        return self.tokens[start:start + n].astype(np.int32)


def iter_texts(paths: Iterable[Path]) -> Iterable[str]:
    from ..data import read_source_text
    for p in paths:
        yield read_source_text(p)
