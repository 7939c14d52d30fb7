"""Offline long-context retrieval tasks in the style of RULER (Hsieh et al., arXiv 2404.06654).

Every generator is seeded and deterministic, needs nothing but a tokenizer, and builds a prompt
whose token length is close to, and never above, a target ``length`` (counted with the
tokenizer's default special tokens, i.e. what the model will see).

Prompt layout of the needle tasks (``passkey``, ``multikey_needle``)::

    PREAMBLE + "\\n" + context + "\\n" + QUESTION_TEMPLATE.format(key=key)

where the context is the haystack with ``NEEDLE_TEMPLATE.format(key=key, value=value)`` inserted
at a sentence (noise haystack) or line (code haystack) boundary. The model should continue with
the value. The strings are module constants because the bundled model is trained on exactly
this format.

Length fitting: a prompt is a function of a number of haystack units (sentences, lines, words);
the generator estimates tokens per unit from a small sample, then tokenizes a handful of
candidate prompts, with secant steps and bisection, and keeps the longest one that fits.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import math
import random
import string
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from . import _words

# ----------------------------------------------------------------------------------------------
# Exact strings (shared with the bundled model's training data)
# ----------------------------------------------------------------------------------------------

#: RULER's "repeat" haystack: these five sentences, cycled
NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
    "There and back again.",
)
#: one needle; ``value`` is a 7-digit number
NEEDLE_TEMPLATE = "One of the special magic numbers for {key} is: {value}."
#: the question closing a needle prompt; the answer follows it
QUESTION_TEMPLATE = ("What is the special magic number for {key} mentioned in the provided text? "
                     "The special magic number for {key} mentioned in the provided text is")
#: the instruction opening a needle prompt (RULER niah_single template, single value)
PREAMBLE = ("A special magic number is hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the number afterwards.")

#: the same three strings for UUID values (RULER niah_multikey_3)
NEEDLE_TEMPLATE_UUID = NEEDLE_TEMPLATE.replace("numbers", "uuids")
QUESTION_TEMPLATE_UUID = QUESTION_TEMPLATE.replace("number", "uuid")
PREAMBLE_UUID = PREAMBLE.replace("number", "uuid")

VT_PREAMBLE = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION_TEMPLATE = (
    "Question: Find all variables that are assigned the value {value} in the text above. "
    "Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assigned the value {value}, they are:")

CWE_PREAMBLE = ("Below is a numbered list of words. In these words, some appear more often than "
                "others. Memorize the ones that appear most often.")
CWE_QUESTION_TEMPLATE = (
    "Question: What are the {k} most common words in the above list? "
    "Answer: The top {k} words that appear most often in the list are:")

FWE_PREAMBLE = ("Read the following coded text and track the frequency of each coded word. "
                "Find the {k_word} most frequently appeared coded words.")
FWE_QUESTION_TEMPLATE = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. What are the "
    "{k_word} most frequently appeared words in the above coded text? Answer: According to the "
    "coded text above, the {k_word} most frequently appeared words are:")

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                 8: "eight", 9: "nine", 10: "ten"}


@dataclass
class Sample:
    """Sample: one generated task instance.

    Attributes:
        prompt: the full prompt text (the model continues it).
        answers: strings expected in the model's output (scored by ``string_match_all``).
        meta: task-specific facts: ``task``, ``length`` (target), ``n_tokens`` (actual),
            ``seed``, and e.g. ``depth``, ``needle_char``/``needle_token`` offsets.
    """
    prompt: str
    answers: list[str]
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Tokenizer adapter
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _encode_kwargs(cls: type) -> tuple[bool, bool]:
    """(accepts add_special_tokens, accepts verbose) for a tokenizer class's ``encode``."""
    try:
        params = inspect.signature(cls.encode).parameters
    except (TypeError, ValueError):
        return False, False
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    has_special = "add_special_tokens" in params or var_kw
    # transformers' tokenizers take ``verbose`` through **kwargs; it silences the
    # "sequence longer than model_max_length" warning that long haystacks trigger.
    has_verbose = "verbose" in params or (var_kw and hasattr(cls, "model_max_length"))
    return has_special, has_verbose


def encode_ids(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """encode_ids: token ids of ``text`` for any tokenizer-like object.

    Accepts a ``transformers`` tokenizer, a ``tokenizers.Tokenizer`` (its ``Encoding.ids``) or any
    object with ``encode(str) -> sequence of ints`` (``add_special_tokens`` is passed only when
    the ``encode`` signature takes it).
    Raises:
        ValueError: ``tokenizer`` has no ``encode`` method.
    """
    enc = getattr(tokenizer, "encode", None)
    if enc is None or not callable(enc):
        raise ValueError(f"tokenizer: expected an object with an encode(str) method, got {type(tokenizer).__name__}")
    has_special, has_verbose = _encode_kwargs(type(tokenizer))
    kwargs: dict[str, Any] = {}
    if has_special:
        kwargs["add_special_tokens"] = add_special_tokens
    if has_verbose:
        kwargs["verbose"] = False
    out = enc(text, **kwargs)
    if hasattr(out, "ids"):
        out = out.ids
    elif hasattr(out, "tolist"):
        out = out.tolist()
    return list(out)


def count_tokens(tokenizer: Any, text: str) -> int:
    """count_tokens: number of tokens the model sees for ``text`` (default special tokens included)."""
    return len(encode_ids(tokenizer, text))


# ----------------------------------------------------------------------------------------------
# Helpers: seeds, keys, haystacks, fitting
# ----------------------------------------------------------------------------------------------

def _check_common(length: Any, seed: Any) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"length: expected a positive int (tokens), got {length!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")


def _check_depth(depth: Any) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not (0.0 <= float(depth) <= 1.0):
        raise ValueError(f"depth: expected a float in [0, 1], got {depth!r}")
    return float(depth)


def _rng(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded from a stable hash of ``parts`` (independent streams per purpose)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _derive_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"sample:{seed}:{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:6], "little")


def _random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _random_key(rng: random.Random, kind: str) -> str:
    if kind == "words":
        return f"{rng.choice(_words.ADJECTIVES)}-{rng.choice(_words.NOUNS)}"
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "number":
        return _random_number(rng, 7)
    raise ValueError(f"key_kind: expected 'words', 'uuid' or 'number', got {kind!r}")


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return _random_number(rng, 7)
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"value_kind: expected 'number' or 'uuid', got {kind!r}")


@functools.lru_cache(maxsize=1)
def _heldout_files() -> tuple:
    from ..data import source_files
    return tuple(source_files("heldout"))


class _Haystack:
    """A deterministic, lazily extended stream of haystack units (noise sentences or code lines)."""

    def __init__(self, kind: str, seed: int, max_line_chars: int = 240):
        if kind not in ("noise", "code"):
            raise ValueError(f"haystack: expected 'noise' or 'code', got {kind!r}")
        self.kind = kind
        self.sep = " " if kind == "noise" else "\n"
        self._lines: list[str] = []
        self._max_line_chars = max_line_chars
        self._files = None
        self._file_pos = 0
        if kind == "code":
            files = list(_heldout_files())
            _rng("code-files", seed).shuffle(files)
            self._files = files

    def units(self, n: int) -> list[str]:
        if self.kind == "noise":
            k = len(NOISE_SENTENCES)
            return [NOISE_SENTENCES[i % k] for i in range(n)]
        from ..data import read_source_text
        while len(self._lines) < n:
            if self._file_pos >= len(self._files):
                raise ValueError(f"length: the held-out source corpus has only {len(self._lines)} lines, "
                                 f"fewer than the {n} needed; use haystack='noise' or a shorter length")
            path = self._files[self._file_pos]
            self._file_pos += 1
            try:
                text = read_source_text(path)
            except OSError:
                continue
            # long lines (data tables, minified blobs) would make the length fit coarse
            self._lines.extend(ln.rstrip() for ln in text.splitlines() if len(ln) <= self._max_line_chars)
        return self._lines[:n]

    def sample_units(self, k: int = 64) -> list[str]:
        return self.units(k)


def _gap_index(frac: float, n: int) -> int:
    """Insertion gap (0..n) for a fractional position in a list of n units."""
    return min(n, max(0, int(round(frac * n))))


def _assemble(units: list[str], inserts: dict[int, list[tuple[str, Any]]], sep: str) -> tuple[str, dict]:
    """Join units with ``sep``, placing ``inserts[g]`` (text, tag) items before unit g (g = len -> end).

    Returns the text and a dict tag -> character offset of that inserted item.
    """
    pieces: list[str] = []
    offsets: dict[Any, int] = {}
    pos = 0

    def put(text: str, tag: Any = None) -> None:
        nonlocal pos
        if pieces:
            pieces.append(sep)
            pos += len(sep)
        if tag is not None:
            offsets[tag] = pos
        pieces.append(text)
        pos += len(text)

    n = len(units)
    for g in range(n + 1):
        for text, tag in inserts.get(g, ()):
            put(text, tag)
        if g < n:
            put(units[g])
    return "".join(pieces), offsets


@dataclass
class _Fit:
    n: int
    prompt: str
    extra: Any
    n_tokens: int


def _fit_units(build: Callable[[int], tuple[str, Any]], tokenizer: Any, length: int, *,
               n_min: int, tokens_per_unit: float, task: str, n_max: int | None = None,
               max_evals: int = 48) -> _Fit:
    """Find the largest unit count n >= n_min whose prompt fits in ``length`` tokens.

    ``build(n) -> (prompt, extra)`` must be deterministic and (roughly) increasing in n; n never
    exceeds ``n_max`` (when given; the result is then n_max if that fits). Uses a
    secant step from the per-unit estimate, then safeguarded bisection; each step tokenizes one
    candidate prompt (typically 3-6 in all).
    """
    cache: dict[int, _Fit] = {}

    def f(n: int) -> _Fit:
        if n not in cache:
            prompt, extra = build(n)
            cache[n] = _Fit(n, prompt, extra, count_tokens(tokenizer, prompt))
        return cache[n]

    lo = n_min
    if f(lo).n_tokens > length:
        raise ValueError(f"length: {length} tokens is too short for task {task!r}: its shortest prompt "
                         f"has {f(lo).n_tokens} tokens")
    tpu = max(float(tokens_per_unit), 1e-3)
    hi: int | None = None
    slack = max(1.0, tpu)  # stop once within about one unit of the target
    bisect_next = False
    for _ in range(max_evals):
        if hi is not None and hi - lo <= 1:
            break
        if length - f(lo).n_tokens <= slack:
            break
        if hi is None:  # secant step from the lowest fitting point, per-unit rate re-estimated
            guess = lo + max(1, int((length - f(lo).n_tokens) / tpu))
            if n_max is not None and guess >= n_max:
                if f(n_max).n_tokens <= length:
                    return f(n_max)
                guess = n_max
        elif bisect_next:
            guess = (lo + hi) // 2
        else:  # interpolate inside the bracket
            t_lo, t_hi = f(lo).n_tokens, f(hi).n_tokens
            guess = lo + int((length - t_lo) * (hi - lo) / max(t_hi - t_lo, 1))
            guess = min(max(guess, lo + 1), hi - 1)
        width = None if hi is None else hi - lo
        t = f(guess).n_tokens
        if guess > n_min:
            tpu = max((t - f(n_min).n_tokens) / (guess - n_min), 1e-3)
        if t <= length:
            lo = guess
        else:
            hi = guess if hi is None else min(hi, guess)
        # safeguard: bisect whenever an interpolation step failed to halve the bracket
        bisect_next = width is not None and not bisect_next and (hi - lo) * 2 > width
    return f(lo)


def _estimate_tpu(tokenizer: Any, units: list[str], sep: str) -> float:
    if not units:
        return 1.0
    text = sep.join(units)
    base = count_tokens(tokenizer, "")
    return max((count_tokens(tokenizer, text) - base) / len(units), 1e-3)


# ----------------------------------------------------------------------------------------------
# Needle tasks
# ----------------------------------------------------------------------------------------------

def _templates(value_kind: str) -> tuple[str, str, str]:
    if value_kind == "number":
        return PREAMBLE, NEEDLE_TEMPLATE, QUESTION_TEMPLATE
    if value_kind == "uuid":
        return PREAMBLE_UUID, NEEDLE_TEMPLATE_UUID, QUESTION_TEMPLATE_UUID
    raise ValueError(f"value_kind: expected 'number' or 'uuid', got {value_kind!r}")


def _needle_sample(task: str, tokenizer: Any, length: int, depth: float, *, seed: int,
                   haystack: str, key_kind: str, value_kind: str, n_distractors: int) -> Sample:
    """Shared builder for single-needle and multi-key-needle prompts."""
    _check_common(length, seed)
    depth = _check_depth(depth)
    if haystack not in ("noise", "code", "needle"):
        raise ValueError(f"haystack: expected 'noise', 'code' or 'needle', got {haystack!r}")
    preamble, needle_tpl, question_tpl = _templates(value_kind)
    _random_key(random.Random(0), key_kind)  # validates key_kind

    rng = _rng(task, "needle", seed)
    key = _random_key(rng, key_kind)

    if haystack == "needle":
        # every haystack unit is a distractor needle with another key (RULER niah_multikey_2/3)
        d_rng = _rng(task, "distractors", seed)
        stream: list[str] = []

        def units(n: int) -> list[str]:
            while len(stream) < n:
                k = _random_key(d_rng, key_kind)
                while k == key:
                    k = _random_key(d_rng, key_kind)
                stream.append(needle_tpl.format(key=k, value=_random_value(d_rng, value_kind)))
            return stream[:n]
        sep = "\n"
        hay = None
        distractor_fracs: list[float] = []
        distractors: list[str] = []
    else:
        hay = _Haystack(haystack, seed)
        units = hay.units
        sep = hay.sep
        d_rng = _rng(task, "distractors", seed)
        distractors = []
        keys_used = {key}
        for _ in range(n_distractors):
            k = _random_key(d_rng, key_kind)
            while k in keys_used:
                k = _random_key(d_rng, key_kind)
            keys_used.add(k)
            distractors.append(needle_tpl.format(key=k, value=_random_value(d_rng, value_kind)))
        distractor_fracs = [d_rng.random() for _ in distractors]

    for attempt in range(32):
        value = _random_value(rng, value_kind)
        needle = needle_tpl.format(key=key, value=value)
        if any(value in d for d in distractors):
            continue

        def build(n: int, needle=needle) -> tuple[str, Any]:
            us = units(n)
            g = _gap_index(depth, n)
            inserts: dict[int, list[tuple[str, Any]]] = {}
            for i, (frac, d) in enumerate(zip(distractor_fracs, distractors)):
                inserts.setdefault(_gap_index(frac, n), []).append((d, ("distractor", i)))
            # the target needle goes after any distractor that shares its gap
            inserts.setdefault(g, []).append((needle, "needle"))
            context, offsets = _assemble(us, inserts, sep)
            head = preamble + "\n"
            prompt = head + context + "\n" + question_tpl.format(key=key)
            return prompt, {"gap": g, "needle_char": len(head) + offsets["needle"],
                            "distractor_chars": sorted(len(head) + v for t, v in offsets.items()
                                                       if isinstance(t, tuple))}

        tpu = _estimate_tpu(tokenizer, units(64), sep)
        fit = _fit_units(build, tokenizer, length, n_min=0, tokens_per_unit=tpu, task=task)
        # the value must occur exactly once (a code haystack may contain the number by chance)
        if fit.prompt.count(value) == 1 and fit.prompt.count(needle) == 1:
            break
    else:  # pragma: no cover - needs 32 unlucky draws
        raise RuntimeError(f"{task}: could not place a unique needle value after 32 attempts")

    needle_char = fit.extra["needle_char"]
    meta = {
        "task": task, "length": length, "n_tokens": fit.n_tokens, "seed": seed,
        "haystack": haystack, "key_kind": key_kind, "value_kind": value_kind,
        "key": key, "value": value, "needle": needle,
        "depth": depth, "n_units": fit.n, "needle_unit": fit.extra["gap"],
        "depth_actual": (fit.extra["gap"] / fit.n) if fit.n else 0.0,
        "needle_char": needle_char,
        "needle_token": count_tokens(tokenizer, fit.prompt[:needle_char]),
        "needle_n_tokens": len(encode_ids(tokenizer, needle, add_special_tokens=False)),
    }
    if haystack != "needle":
        meta["n_distractors"] = len(distractors)
        meta["distractor_chars"] = fit.extra["distractor_chars"]
    return Sample(prompt=fit.prompt, answers=[value], meta=meta)


def passkey(tokenizer: Any, length: int, depth: float, *, seed: int, haystack: str = "noise",
            key_kind: str = "words") -> Sample:
    """passkey: one needle in a haystack (RULER niah_single, Hsieh et al., arXiv 2404.06654).

    Args:
        tokenizer: a ``transformers``/``tokenizers`` tokenizer or any object with ``encode``.
        length: target prompt length in tokens (the prompt never exceeds it).
        depth: fractional needle position in the haystack, 0.0 (start) .. 1.0 (end); the needle is
            inserted at the nearest sentence (noise) or line (code) boundary.
        seed: makes the sample deterministic.
        haystack: ``"noise"`` (the five repeated sentences of ``NOISE_SENTENCES``) or ``"code"``
            (held-out Python source files of this installation, chosen by the seed).
        key_kind: ``"words"`` (adjective-noun), ``"uuid"`` or ``"number"``.
    Returns:
        ``Sample`` with ``answers=[value]`` (a 7-digit number that appears once in the prompt);
        ``meta`` has ``needle_char`` (offset in the prompt), ``needle_token`` (tokens before it),
        ``depth_actual`` (units before the needle / units) and ``n_tokens``.
    """
    if haystack not in ("noise", "code"):
        raise ValueError(f"haystack: expected 'noise' or 'code', got {haystack!r}")
    return _needle_sample("passkey", tokenizer, length, depth, seed=seed, haystack=haystack,
                          key_kind=key_kind, value_kind="number", n_distractors=0)


def multikey_needle(tokenizer: Any, length: int, depth: float, *, seed: int, haystack: str = "needle",
                    key_kind: str = "words", value_kind: str = "number", n_keys: int = 4) -> Sample:
    """multikey_needle: a needle among distractor needles with other keys (RULER niah_multikey, arXiv 2404.06654).

    Args:
        tokenizer, length, depth, seed: as in ``passkey``.
        haystack: ``"needle"`` (the haystack is made of distractor needles, RULER multikey_2/3),
            ``"noise"`` or ``"code"`` (``n_keys - 1`` distractor needles at random positions in it,
            RULER multikey_1).
        key_kind: ``"words"``, ``"uuid"`` (multikey_3 uses uuid keys and values) or ``"number"``.
        value_kind: ``"number"`` (7 digits) or ``"uuid"``.
        n_keys: needles in a noise/code haystack, the queried one included (ignored for "needle").
    Returns:
        ``Sample`` with ``answers=[value]``; ``meta`` as in ``passkey``.
    """
    if isinstance(n_keys, bool) or not isinstance(n_keys, int) or n_keys < 1:
        raise ValueError(f"n_keys: expected an int >= 1, got {n_keys!r}")
    return _needle_sample("multikey_needle", tokenizer, length, depth, seed=seed, haystack=haystack,
                          key_kind=key_kind, value_kind=value_kind,
                          n_distractors=0 if haystack == "needle" else n_keys - 1)


# ----------------------------------------------------------------------------------------------
# Variable tracking
# ----------------------------------------------------------------------------------------------

def variable_tracking(tokenizer: Any, length: int, *, seed: int, num_chains: int = 1, num_hops: int = 4,
                      haystack: str = "noise") -> Sample:
    """variable_tracking: follow chains of variable assignments hidden in noise (RULER vt, arXiv 2404.06654).

    Each chain is ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... (``num_hops`` hops); the
    statements of a chain keep their order and sit at random unit boundaries. The question asks
    for every variable bound to the first chain's value.

    Args:
        tokenizer, length, seed: as in ``passkey``.
        num_chains: chains inserted (the others, with other values, are distractors).
        num_hops: assignments after the first in each chain.
        haystack: ``"noise"`` or ``"code"``.
    Returns:
        ``Sample`` with ``answers`` = the ``num_hops + 1`` variable names of chain 0; ``meta`` has
        ``value`` and ``statement_chars`` (prompt offsets of chain 0's statements, in order).
    """
    _check_common(length, seed)
    for name, v, lo in (("num_chains", num_chains, 1), ("num_hops", num_hops, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    hay = _Haystack(haystack, seed)
    rng = _rng("variable_tracking", seed)
    n_vars = num_chains * (num_hops + 1)
    tpu = _estimate_tpu(tokenizer, hay.sample_units(), hay.sep)
    head = VT_PREAMBLE + "\n\n"
    for _attempt in range(16):
        names: list[str] = []
        while len(names) < n_vars:
            nm = "".join(rng.choices(string.ascii_uppercase, k=5))
            if nm not in names:
                names.append(nm)
        values: list[str] = []
        while len(values) < num_chains:
            v = str(rng.randint(10000, 99999))
            if v not in values:
                values.append(v)
        chains: list[list[str]] = []
        for c in range(num_chains):
            vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
            chains.append([f"VAR {vs[0]} = {values[c]}"] +
                          [f"VAR {vs[j + 1]} = VAR {vs[j]}" for j in range(num_hops)])
        fracs = [sorted(rng.random() for _ in chain) for chain in chains]
        value = values[0]
        question = VT_QUESTION_TEMPLATE.format(value=value, num_v=num_hops + 1)

        def build(n: int, chains=chains, fracs=fracs, question=question) -> tuple[str, Any]:
            us = hay.units(n)
            inserts: dict[int, list[tuple[float, str, Any]]] = {}
            for c, (chain, fr) in enumerate(zip(chains, fracs)):
                for j, (stmt, f_) in enumerate(zip(chain, fr)):
                    inserts.setdefault(_gap_index(f_, n), []).append((f_, stmt, (c, j)))
            ordered = {g: [(s_, t) for _, s_, t in sorted(items, key=lambda x: x[0])]
                       for g, items in inserts.items()}
            context, offsets = _assemble(us, ordered, hay.sep)
            prompt = head + context + "\n" + question
            return prompt, [len(head) + offsets[(0, j)] for j in range(num_hops + 1)]

        fit = _fit_units(build, tokenizer, length, n_min=0, tokens_per_unit=tpu, task="variable_tracking")
        # each name is bound once and (except a chain's last) read once; a code haystack that
        # happens to contain a name would make the answer ambiguous: draw new names then
        last_of_chain = set(names[num_hops::num_hops + 1])
        if all(fit.prompt.count(nm) == (1 if nm in last_of_chain else 2) for nm in names):
            break
    else:  # pragma: no cover - needs 16 unlucky draws
        raise RuntimeError("variable_tracking: variable names keep occurring in the haystack")
    answers = names[:num_hops + 1]
    meta = {"task": "variable_tracking", "length": length, "n_tokens": fit.n_tokens, "seed": seed,
            "haystack": haystack, "value": value, "num_chains": num_chains, "num_hops": num_hops,
            "n_units": fit.n, "statement_chars": fit.extra}
    return Sample(prompt=fit.prompt, answers=list(answers), meta=meta)


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


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    "multikey_needle": multikey_needle,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}

#: tasks whose generator takes a needle ``depth``
DEPTH_TASKS = frozenset({"passkey", "multikey_needle"})


def get_task(name: str) -> Callable[..., Sample]:
    """get_task: the generator registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"task: unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}") from None


def make_samples(task: str, tokenizer: Any, length: int, n: int, *, seed: int, progress: bool = True,
                 **kw: Any) -> list[Sample]:
    """make_samples: ``n`` samples of a task, sample i seeded from (seed, i).

    For needle tasks, ``depth=`` in ``kw`` fixes the depth; otherwise depths sweep evenly over
    [0, 1] across the n samples (``linspace(0, 1, n)``, 0.5 when n == 1). Other keyword arguments
    go to the generator.
    Raises:
        ValueError: unknown task, ``n`` < 1, or a bad generator argument.
    """
    gen = get_task(task)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    _check_common(length, seed)
    if task not in DEPTH_TASKS and "depth" in kw:
        raise ValueError(f"depth: task {task!r} takes no depth")
    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"{task}@{length}", leave=False)
    out = []
    for i in iterator:
        args = dict(kw)
        if task in DEPTH_TASKS:
            depth = args.pop("depth", None)
            if depth is None:
                depth = i / (n - 1) if n > 1 else 0.5
            out.append(gen(tokenizer, length, depth, seed=_derive_seed(seed, i), **args))
        else:
            out.append(gen(tokenizer, length, seed=_derive_seed(seed, i), **args))
    return out
