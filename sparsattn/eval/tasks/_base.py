"""The shared part of the RULER-style tasks: the exact prompt strings, ``Sample``, tokenizer
helpers, seeded randomness, haystacks and the length fitting (see the package docstring)."""
from __future__ import annotations

import functools
import hashlib
import inspect
import random
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import _words


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


#: haystack kinds: RULER's noise sentences, lines of the held-out source files, prose lines of the
#: installation's documentation (text the bundled model never saw in training)
HAYSTACK_KINDS = ("noise", "code", "prose")


@functools.lru_cache(maxsize=1)
def _heldout_files() -> tuple:
    from ...data import source_files
    return tuple(source_files("heldout"))


@functools.lru_cache(maxsize=1)
def _prose_files() -> tuple:
    from ...data import prose_files
    return tuple(prose_files())


class _Haystack:
    """A deterministic, lazily extended stream of haystack units (noise sentences, held-out code lines or
    prose lines of the installation's documentation, ``sparsattn.data.prose``)."""

    def __init__(self, kind: str, seed: int, max_line_chars: int = 240):
        if kind not in HAYSTACK_KINDS:
            raise ValueError(f"haystack: expected one of {HAYSTACK_KINDS}, got {kind!r}")
        self.kind = kind
        self.sep = "\n" if kind == "code" else " "
        self._lines: list[str] = []
        self._max_line_chars = max_line_chars
        self._files = None
        self._file_pos = 0
        if kind in ("code", "prose"):
            files = list(_heldout_files() if kind == "code" else _prose_files())
            _rng(f"{kind}-files", seed).shuffle(files)
            self._files = files

    def units(self, n: int) -> list[str]:
        if self.kind == "noise":
            k = len(NOISE_SENTENCES)
            return [NOISE_SENTENCES[i % k] for i in range(n)]
        from ...data import prose_lines, read_source_text
        while len(self._lines) < n:
            if self._file_pos >= len(self._files):
                raise ValueError(f"length: the {self.kind} haystack corpus has only {len(self._lines)} lines, "
                                 f"fewer than the {n} needed; use haystack='noise' or a shorter length")
            path = self._files[self._file_pos]
            self._file_pos += 1
            if self.kind == "prose":
                self._lines.extend(prose_lines(path))
                continue
            try:
                text = read_source_text(path)
            except OSError:
                continue
            # long lines (data tables, minified blobs) would make the length fit coarse
            self._lines.extend(ln.rstrip() for ln in text.splitlines() if len(ln) <= self._max_line_chars)
        return self._lines[:n]

    def files_read(self) -> list:
        """The corpus files this stream has read so far, in reading order (empty for noise)."""
        return list(self._files[:self._file_pos]) if self._files is not None else []

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
