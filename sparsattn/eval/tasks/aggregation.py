"""Aggregation tasks: ``common_words`` (CWE) and ``frequent_words`` (FWE) from RULER."""
from __future__ import annotations

import functools
import math
import random
import string
from typing import Any, Callable

from .. import _words
from ._base import (CWE_PREAMBLE, CWE_QUESTION_TEMPLATE, FWE_PREAMBLE, FWE_QUESTION_TEMPLATE, Sample,
                    _NUMBER_WORDS, _check_common, _estimate_tpu, _fit_units, _rng)


# ----------------------------------------------------------------------------------------------
# Common / frequent word extraction
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _word_pool(mixed: bool) -> tuple[str, ...]:
    """Word pool of common_words: the single words, or (mixed) those plus adjective-noun compounds."""
    if not mixed:
        return _words.SINGLE_WORDS
    return _words.SINGLE_WORDS + tuple(f"{a}-{b}" for a in _words.ADJECTIVES for b in _words.NOUNS)


def _prefix_sample(rng: random.Random, pool: list[str], k: int) -> list[str]:
    """k distinct items by a partial Fisher-Yates shuffle: the draw for k is a prefix of the one for k+1."""
    pool = list(pool)
    for i in range(k):
        j = rng.randrange(i, len(pool))
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def _cwe_list(rng: random.Random, words: list[str], n_common: int, freq_c: int, freq_u: int) -> str:
    common, uncommon = words[:n_common], words[n_common:]
    seq = common * freq_c + uncommon * freq_u
    rng.shuffle(seq)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq))


def common_words(tokenizer: Any, length: int, *, seed: int, num_cw: int = 10, freq_cw: int | None = None,
                 freq_ucw: int | None = None, fewshot: bool = True) -> Sample:
    """common_words: name the most repeated words of a numbered list (RULER cwe, arXiv 2404.06654).

    ``num_cw`` common words appear ``freq_cw`` times each, every other word ``freq_ucw`` times;
    RULER's defaults are 30/3 from 4096 tokens up and 6/1 below. A one-shot example (a short list
    and its answer) precedes the list when ``fewshot``. The number of distinct words is fitted to
    ``length``; when the built-in single words run out, adjective-noun compounds are used.

    Returns:
        ``Sample`` with ``answers`` = the ``num_cw`` common words; ``meta`` has ``n_words``.
    """
    _check_common(length, seed)
    if isinstance(num_cw, bool) or not isinstance(num_cw, int) or num_cw < 1:
        raise ValueError(f"num_cw: expected an int >= 1, got {num_cw!r}")
    big = length >= 4096
    freq_cw = (30 if big else 6) if freq_cw is None else freq_cw
    freq_ucw = (3 if big else 1) if freq_ucw is None else freq_ucw
    if not (isinstance(freq_cw, int) and isinstance(freq_ucw, int) and freq_cw > freq_ucw >= 1):
        raise ValueError(f"freq_cw, freq_ucw: expected ints with freq_cw > freq_ucw >= 1, got {freq_cw}, {freq_ucw}")
    ex_words, ex_fc, ex_fu = (40, 10, 3) if big else (20, 3, 1)
    ex_common = min(num_cw, ex_words // 2)
    question = CWE_QUESTION_TEMPLATE.format(k=num_cw)
    ex_question = CWE_QUESTION_TEMPLATE.format(k=ex_common)

    n_ex = ex_words if fewshot else 0

    def make_build(pool: tuple[str, ...]) -> Callable[[int], tuple[str, Any]]:
        def build(n_uncommon: int) -> tuple[str, Any]:
            n_words = num_cw + n_uncommon
            # prefix-stable draw: the same seed gives the same first words for every n, so the
            # prompt length grows smoothly with n and the length fit converges in a few steps
            chosen = _prefix_sample(_rng("common_words", seed, "words", len(pool)), pool, n_words + n_ex)
            ex, words = chosen[:n_ex], chosen[n_ex:]
            r = _rng("common_words", seed, n_uncommon)
            parts = []
            if fewshot:
                ex_list = _cwe_list(r, ex, ex_common, ex_fc, ex_fu)
                ex_answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex[:ex_common]))
                parts.append(f"{CWE_PREAMBLE}\n{ex_list}\n{ex_question} {ex_answer}\n")
            parts.append(f"{CWE_PREAMBLE}\n{_cwe_list(r, words, num_cw, freq_cw, freq_ucw)}\n{question}")
            return "".join(parts), words[:num_cw]
        return build

    probe = [f"{i + 100}. {w}" for i, w in enumerate(_words.SINGLE_WORDS[:64])]
    tpu = _estimate_tpu(tokenizer, probe, " ") * freq_ucw
    # short lists use real single words; when those cannot fill `length`, the whole list (common
    # words included) is drawn from single words + compounds, so word shape gives nothing away
    pool = _word_pool(False)
    fit = _fit_units(make_build(pool), tokenizer, length, n_min=1, tokens_per_unit=tpu, task="common_words",
                     n_max=len(pool) - num_cw - n_ex)
    if fit.n == len(pool) - num_cw - n_ex and fit.n_tokens < 0.97 * length:
        pool = _word_pool(True)
        fit = _fit_units(make_build(pool), tokenizer, length, n_min=1, tokens_per_unit=tpu,
                         task="common_words", n_max=len(pool) - num_cw - n_ex)
    meta = {"task": "common_words", "length": length, "n_tokens": fit.n_tokens, "seed": seed,
            "n_words": num_cw + fit.n, "freq_cw": freq_cw, "freq_ucw": freq_ucw, "fewshot": fewshot}
    return Sample(prompt=fit.prompt, answers=list(fit.extra), meta=meta)


def _zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta(alpha), alpha > 1: partial sum plus the Euler-Maclaurin tail."""
    n = terms
    s = math.fsum(k ** -alpha for k in range(1, n))
    return s + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha + alpha * n ** (-alpha - 1) / 12


def frequent_words(tokenizer: Any, length: int, *, seed: int, num_top: int = 3, alpha: float = 2.0,
                   vocab_size: int | None = None, word_len: int = 6) -> Sample:
    """frequent_words: name the most frequent coded words of a Zipf-distributed text (RULER fwe, arXiv 2404.06654).

    A vocabulary of random ``word_len``-letter words; the word of rank k appears
    ``floor(n * k**-alpha / zeta(alpha))`` times (rank 1 is the noise token ``...``, to be ignored),
    shuffled. ``n`` is fitted to ``length``; ``vocab_size`` defaults to ``length // 50`` (RULER).

    Returns:
        ``Sample`` with ``answers`` = the words of ranks 2..num_top+1 (strictly more frequent than
        every other word); ``meta`` has ``counts`` of the answers.
    """
    _check_common(length, seed)
    if isinstance(num_top, bool) or not isinstance(num_top, int) or not 1 <= num_top <= 10:
        raise ValueError(f"num_top: expected an int in 1..10, got {num_top!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 1.0:
        raise ValueError(f"alpha: expected a float > 1, got {alpha!r}")
    vocab_size = max(length // 50, num_top + 2) if vocab_size is None else vocab_size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < num_top + 2:
        raise ValueError(f"vocab_size: expected an int >= num_top + 2 = {num_top + 2}, got {vocab_size!r}")
    rng = _rng("frequent_words", seed)
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        w = "".join(rng.choices(string.ascii_lowercase, k=word_len))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    vocab[0] = "..."  # the top-ranked "word" is noise
    z = _zeta(float(alpha))
    k_word = _NUMBER_WORDS[num_top]

    def counts(n: int) -> list[int]:
        return [int(n * (k ** -alpha) / z) for k in range(1, vocab_size + 1)]

    def separable(n: int) -> bool:
        c = counts(n)
        return all(c[i] > c[i + 1] for i in range(1, num_top + 1))

    n_min = num_top + 2
    while not separable(n_min):
        n_min += 1

    head = FWE_PREAMBLE.format(k_word=k_word) + " "
    question = "\n" + FWE_QUESTION_TEMPLATE.format(k_word=k_word)

    def build(n: int) -> tuple[str, Any]:
        n = max(n, n_min)
        seq = [w for w, c in zip(vocab, counts(n)) for _ in range(c)]
        _rng("frequent_words", seed, n).shuffle(seq)
        return head + " ".join(seq) + question, n

    tpu = _estimate_tpu(tokenizer, vocab[1:65], " ")
    fit = _fit_units(build, tokenizer, length, n_min=n_min, tokens_per_unit=tpu, task="frequent_words")
    if not separable(fit.n):  # the fitted n sits above n_min, where ranks only get more separated
        raise RuntimeError("frequent_words: top words not separable")  # pragma: no cover
    c = counts(fit.n)
    meta = {"task": "frequent_words", "length": length, "n_tokens": fit.n_tokens, "seed": seed,
            "n_words": sum(c), "vocab_size": vocab_size, "alpha": alpha,
            "counts": c[1:num_top + 1], "next_count": c[num_top + 1]}
    return Sample(prompt=fit.prompt, answers=vocab[1:num_top + 1], meta=meta)
