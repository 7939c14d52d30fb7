"""Training data for the bundled model: a packed code corpus plus synthetic retrieval tasks.

* ``Corpus``: the train-split Python files of this installation (``sparsattn.data.source_files``),
  tokenized in parallel (``encode_batch_fast``) into one token stream ``<s> doc </s> <s> doc ...``;
  a training sequence is a random window of it (documents packed, EOS-separated).
* ``RetrievalTasks``: synthetic long-context retrieval samples in the exact prompt format of
  ``sparsattn.eval.tasks`` (RULER, Hsieh et al., arXiv 2404.06654): single needles (pass keys),
  multi-key needles (distractor needles in noise/code, or a haystack made of needles), variable
  tracking chains, and JSON-like key-value lists. Each sample is assembled at the token level from
  separately encoded segments whose boundaries are pre-token boundaries, so the ids equal the
  tokenization of the whole prompt string (tested), with no re-tokenization of long haystacks.
  After the first answer (the evaluation format) further questions about other needles may
  follow, which adds answer tokens per sample at no extra context cost.
* ``BatchMaker``: deterministic batches ``tokens[B, L+1]`` (int32) and ``groups[B, L+1]`` (uint8,
  the loss group of each token as a *target*): 0 ignored, 1 language modelling (corpus text, code
  haystack lines), 2 retrieval answer. Batch ``i`` depends only on ``(seed, L, i)``.
* ``BatchStream``: an ``IterableDataset`` over ``BatchMaker`` for a ``DataLoader`` with worker
  processes (worker w makes batches w, w + W, ...: the loader's round robin keeps the order).

Noise haystack tokens, needles and questions carry no loss: they are either trivially repetitive
or random identifiers; only the answers (group 2, averaged separately and up-weighted by the
trainer) and real code (group 1) are trained on.
"""
from __future__ import annotations

import hashlib
import random
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..eval import _words
from ..eval.tasks import (NEEDLE_TEMPLATE, NEEDLE_TEMPLATE_UUID, NOISE_SENTENCES, PREAMBLE, PREAMBLE_UUID,
                          QUESTION_TEMPLATE, QUESTION_TEMPLATE_UUID, VT_PREAMBLE, VT_QUESTION_TEMPLATE)

GROUP_IGNORE, GROUP_LM, GROUP_ANSWER = 0, 1, 2

#: key-value list task (our own format; the evaluation suite has no kv task)
KV_PREAMBLE = "Extract the value corresponding to the specified key in the JSON object below."
KV_QUESTION_TEMPLATE = 'Key: "{key}"\nThe value associated with the specified key is:'

#: default mixture of synthetic tasks (probabilities)
DEFAULT_MIX = {"passkey": 0.30, "multikey": 0.35, "variable_tracking": 0.20, "kv": 0.15}

_MAX_LINE_CHARS = 240  # as the evaluation's code haystack


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


# ------------------------------------------------------------------------------------------------
# Corpus
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Synthetic retrieval tasks
# ------------------------------------------------------------------------------------------------

@dataclass
class SynthSample:
    """SynthSample: one synthetic sequence of exactly the requested length.

    Attributes:
        ids: int32 token ids; groups: uint8 loss group of each id (as a prediction target).
        prompt_start: index of the BOS that opens the prompt (front filler before it);
        prompt_end: index of the first answer token (the evaluation prompt is ids[start:end]).
        answers: the answer strings in order (the first one answers the evaluation prompt).
        prompt: the prompt text (``ids[prompt_start + 1:prompt_end]`` is its tokenization);
            only filled when the generator was built with ``with_text=True`` (tests).
        meta: task, keys/values, depths and gaps, token spans of needles (``spans``) and of the
            context (``context_span``), number of haystack units.
    """
    ids: np.ndarray
    groups: np.ndarray
    prompt_start: int
    prompt_end: int
    answers: list[str]
    prompt: str | None = None
    meta: dict = field(default_factory=dict)


class _Seg:
    """A piece of a sample: token ids, their loss group, their text (None: decode the ids), a tag."""
    __slots__ = ("ids", "group", "text", "tag")

    def __init__(self, ids, group: int, text: str | None = None, tag=None):
        self.ids, self.group, self.text, self.tag = ids, group, text, tag


class Pieces:
    """Pieces: token ids of prompt pieces, assembled without re-tokenizing long text.

    Byte-level BPE never merges across a pre-token boundary, and a space before a word, a
    newline before a non-space, punctuation after a word and every single digit start a new
    pre-token. So ``ids(template.format(key=k))`` is ``ids(literal) + ids(" " + k) + ...`` when each
    field follows a space or punctuation; literals and fields are cached and 7-digit numbers are
    spelled digit by digit. ``check()`` verifies this against whole-string encoding.
    """

    def __init__(self, raw, cache_size: int = 200_000):
        self.raw = raw
        self.cache_size = cache_size
        self._lit: dict[str, list[int]] = {}
        self._field: dict[tuple[str, bool], list[int]] = {}
        self._tmpl: dict[str, list] = {}
        self.digits = [self._single(str(d)) for d in range(10)]
        self.space = self._single(" ")
        self.newline = self._single("\n")

    def _single(self, ch: str) -> int:
        ids = encode_many(self.raw, [ch])[0]
        if len(ids) != 1:
            raise ValueError(f"tokenizer: {ch!r} is not a single token")
        return ids[0]

    def lit(self, text: str) -> list[int]:
        """ids of a literal; a trailing whitespace run is split as it is before a non-space."""
        ids = self._lit.get(text)
        if ids is None:
            if text and text[-1].isspace():
                ids = encode_many(self.raw, [text + "X"])[0]
                if self.raw.id_to_token(ids[-1]) != "X":
                    raise ValueError("tokenizer: a trailing whitespace run merged with the next character")
                ids = ids[:-1]
            else:
                ids = encode_many(self.raw, [text])[0] if text else []
            self._lit[text] = ids
        return ids

    def fields(self, texts: Sequence[str], space: bool = True) -> list[list[int]]:
        """ids of ``" " + t`` (``space``) or ``t`` for each text: digits spelled out, others cached."""
        out: list = [None] * len(texts)
        miss: list[int] = []
        for i, t in enumerate(texts):
            if t.isascii() and t.isdigit():
                out[i] = ([self.space] if space else []) + [self.digits[ord(c) - 48] for c in t]
            else:
                ids = self._field.get((t, space))
                if ids is None:
                    miss.append(i)
                else:
                    out[i] = ids
        if miss:
            enc = encode_many(self.raw, [(" " + texts[i]) if space else texts[i] for i in miss])
            for i, ids in zip(miss, enc):
                out[i] = ids
                if len(self._field) < self.cache_size:
                    self._field[(texts[i], space)] = ids
        return out

    def _parse(self, template: str) -> list:
        parts = self._tmpl.get(template)
        if parts is None:
            import re

            parts = []
            pos = 0
            for m in re.finditer(r"\{(\w+)\}", template):
                lit = template[pos:m.start()].replace("{{", "{").replace("}}", "}")
                space = lit.endswith(" ")
                if space:
                    lit = lit[:-1]
                if lit:
                    parts.append(("lit", lit))
                parts.append(("field", m.group(1), space))
                pos = m.end()
            tail = template[pos:].replace("{{", "{").replace("}}", "}")
            if tail:
                parts.append(("lit", tail))
            self._tmpl[template] = parts
        return parts

    def render(self, template: str, **columns: Sequence[str]) -> list[list[int]]:
        """ids of ``template.format(**row)`` for every row of the equal-length ``columns``."""
        parts = self._parse(template)
        n = len(next(iter(columns.values()))) if columns else 1
        cols = {}
        for p in parts:
            if p[0] == "field" and (p[1], p[2]) not in cols:
                cols[(p[1], p[2])] = self.fields(columns[p[1]], p[2])
        out = []
        for r in range(n):
            ids: list[int] = []
            for p in parts:
                ids += self.lit(p[1]) if p[0] == "lit" else cols[(p[1], p[2])][r]
            out.append(ids)
        return out

    def check(self, template: str, **columns: Sequence[str]) -> None:
        """check: ``render`` equals whole-string encoding for these rows, else ValueError."""
        got = self.render(template, **columns)
        n = len(got)
        texts = [template.format(**{k: v[r] for k, v in columns.items()}) for r in range(n)]
        want = encode_many(self.raw, texts)
        for t, g, w in zip(texts, got, want):
            if g != w:
                raise ValueError(f"tokenizer: piecewise ids of {t!r} differ from its encoding; "
                                 "the synthetic data needs a byte-level BPE with pre-token boundaries")


class RetrievalTasks:
    """RetrievalTasks: synthetic retrieval samples in the evaluation format (RULER, arXiv 2404.06654).

    Args:
        raw: a ``tokenizers.Tokenizer`` (see ``raw_tokenizer``), byte-level BPE.
        corpus: train-split token stream, for code haystacks and front filler.
        bos_id, eos_id: special token ids.
        mix: task -> probability (keys of ``DEFAULT_MIX``).
        with_text: also build each sample's prompt text (slower; for tests).
    """

    def __init__(self, raw, corpus: Corpus, *, bos_id: int, eos_id: int, mix: dict | None = None,
                 with_text: bool = False):
        self.raw, self.corpus, self.bos, self.eos = raw, corpus, int(bos_id), int(eos_id)
        self.with_text = with_text
        mix = dict(DEFAULT_MIX if mix is None else mix)
        bad = sorted(set(mix) - set(DEFAULT_MIX))
        if bad or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"mix: expected non-negative weights over {sorted(DEFAULT_MIX)}, got {mix}")
        total = sum(mix.values())
        self.tasks = list(mix)
        self.probs = [mix[t] / total for t in self.tasks]
        self.p = Pieces(raw)
        k = len(NOISE_SENTENCES)
        self._noise_first = [self.p.lit(s) for s in NOISE_SENTENCES]
        self._noise_next = [self.p.lit(" " + s) for s in NOISE_SENTENCES]
        self._noise_cycle = sum(len(x) for x in self._noise_next)
        self._tile_units(4096)
        # newline structure of every token (all newline tokens of byte-level BPE are whitespace runs)
        vocab = raw.get_vocab_size()
        strs = [raw.decode([i]) for i in range(vocab)]
        self._has_nl = np.array(["\n" in t for t in strs], dtype=bool)
        self._ends_nl = np.array([t.endswith("\n") for t in strs], dtype=bool)
        self._starts_ws = np.array([bool(t) and t[0].isspace() for t in strs], dtype=bool)
        for i in (self.bos, self.eos):
            self._has_nl[i] = self._ends_nl[i] = self._starts_ws[i] = False
        # the piecewise assembly must reproduce whole-string encoding for every template in use
        probe = random.Random(0)
        keys = [self._key(probe, kd) for kd in ("words", "uuid", "number") for _ in range(2)]
        vals = [self._value(probe, "number"), self._value(probe, "uuid")] * 3
        for tpl in (NEEDLE_TEMPLATE, NEEDLE_TEMPLATE_UUID, "\n" + QUESTION_TEMPLATE, ".\n" + QUESTION_TEMPLATE,
                    '"{key}": "{value}"', '\n' + KV_QUESTION_TEMPLATE):
            self.p.check(tpl, key=keys, value=vals)

    # -------------------------------------------------------------- random draws
    @staticmethod
    def _key(rng: random.Random, kind: str) -> str:
        if kind == "words":
            return f"{rng.choice(_words.ADJECTIVES)}-{rng.choice(_words.NOUNS)}"
        if kind == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if kind == "number":
            return str(rng.randint(1_000_000, 9_999_999))
        raise ValueError(f"key_kind: expected 'words', 'uuid' or 'number', got {kind!r}")

    @staticmethod
    def _value(rng: random.Random, kind: str) -> str:
        if kind == "number":
            return str(rng.randint(1_000_000, 9_999_999))
        if kind == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise ValueError(f"value_kind: expected 'number' or 'uuid', got {kind!r}")

    def _distinct(self, rng: random.Random, draw, kind: str, n: int) -> list[str]:
        out: list[str] = []
        seen: set = set()
        tries = 0
        while len(out) < n:
            x = draw(rng, kind)
            tries += 1
            if x not in seen:
                seen.add(x)
                out.append(x)
            elif tries > 20 * n + 100:
                raise ValueError(f"n: cannot draw {n} distinct {kind} items")
        return out

    # -------------------------------------------------------------- haystacks
    def _noise_count(self, avail: int) -> int:
        """Largest number of noise sentences whose joined ids fit ``avail`` tokens."""
        if avail <= 0:
            return 0
        k = len(NOISE_SENTENCES)
        n = k * (avail // self._noise_cycle)
        used = (n // k) * self._noise_cycle
        while used + len(self._noise_next[n % k]) <= avail:
            used += len(self._noise_next[n % k])
            n += 1
        return n

    def _line_start(self, p: np.ndarray) -> int:
        """Index of the first non-indented line start in ``p`` (after a token ending in a newline), -1 if none."""
        starts = np.flatnonzero(self._ends_nl[p[:-1]] & ~self._starts_ws[p[1:]])
        return int(starts[0]) + 1 if len(starts) else -1

    def _code(self, nprng: np.random.Generator, avail: int) -> tuple[np.ndarray, list[int]]:
        """Code haystack at the token level, shaped like the evaluation's: a corpus window starting at
        a non-indented line start; at each file boundary the file's trailing whitespace is cut and
        the next file follows after one newline (so the ids equal the encoding of the joined text);
        it ends at a line end, at most ``avail`` tokens. Returns the ids and the line boundaries
        (positions of the newline tokens that open lines 1, 2, ...)."""
        best = (np.zeros(0, dtype=np.int32), [])
        if avail < 8:
            return best
        nl_tok = np.array([self.p.newline], dtype=np.int32)
        for _ in range(6):
            w = self.corpus.window(nprng, min(len(self.corpus), avail + 1024))
            cut = np.flatnonzero((w == self.bos) | (w == self.eos)).tolist()
            edges = [-1] + cut + [len(w)]
            out: list[np.ndarray] = []
            for a, b in zip(edges[:-1], edges[1:]):
                p = w[a + 1:b]
                if len(p) < 2:
                    continue
                if not out or self._starts_ws[p[0]] or a < 0:
                    s = self._line_start(p)
                    if s < 0:
                        continue
                    p = p[s:]
                if b < len(w):  # the file ends here: drop its last newline run and what follows
                    nl = np.flatnonzero(self._has_nl[p])
                    if not len(nl) or nl[-1] == 0:
                        continue
                    p = p[:nl[-1]]
                if out:
                    out.append(nl_tok)
                out.append(p)
            if not out:
                continue
            ctx = np.concatenate(out)
            nl = np.flatnonzero(self._has_nl[ctx[:avail + 1]])
            if not len(nl) or nl[-1] == 0:
                continue
            end = int(nl[-1])
            ctx = ctx[:end]
            if len(ctx) > len(best[0]):
                best = (ctx, [int(x) for x in nl[:-1] if x > 0])
            if len(ctx) >= 0.9 * avail:
                break
        return best

    # -------------------------------------------------------------- assembly
    def _tile_units(self, n: int) -> None:
        """Noise sentences 0..n-1 (" "-prefixed form) as one array, with each unit's start offset."""
        k = len(NOISE_SENTENCES)
        n = k * (-(-n // k))
        self._noise_tiled = np.array([t for i in range(n) for t in self._noise_next[i % k]], dtype=np.int32)
        self._noise_off = np.concatenate([[0], np.cumsum([len(self._noise_next[i % k]) for i in range(n)])])

    def _noise_context(self, n_units: int, inserts: dict) -> list[_Seg]:
        """Noise context: runs of sentences are slices of a pre-tokenized tile (sentence g is
        ``NOISE_SENTENCES[g % 5]``, joined by " "); ``inserts`` as in ``_units_context``."""
        if n_units + 1 >= len(self._noise_off):
            self._tile_units(2 * n_units + 8)
        k = len(NOISE_SENTENCES)
        segs: list[_Seg] = []
        first = True
        g0 = 0
        for g in sorted(set(inserts) | {n_units}):
            if g > g0:  # sentences g0 .. g-1
                ids = self._noise_tiled[self._noise_off[g0]:self._noise_off[g]]
                text = None
                if self.with_text:
                    text = "".join(" " + NOISE_SENTENCES[i % k] for i in range(g0, g))
                if first:
                    ids = np.concatenate([np.asarray(self._noise_first[g0 % k], dtype=np.int32),
                                          ids[len(self._noise_next[g0 % k]):]])
                    text = text[1:] if text is not None else None
                segs.append(_Seg(ids, GROUP_IGNORE, text))
                first = False
            for f_ids, n_ids, text, tag in inserts.get(g, ()):
                segs.append(_Seg(f_ids if first else n_ids, GROUP_IGNORE, text if first else " " + text, tag))
                first = False
            g0 = g
        return segs

    def _code_context(self, ctx: np.ndarray, bounds: list[int], inserts: dict) -> list[_Seg]:
        """Code context with "\\n" + item inserted before the line boundary ``bounds[g - 1]``
        (g = 0: before the first line, g = len(bounds) + 1: after the last)."""
        segs: list[_Seg] = []
        n_units = len(bounds) + 1
        cuts = [0] + bounds + [len(ctx)]
        for g in range(n_units + 1):
            items = inserts.get(g, ())
            for j, (f_ids, n_ids, text, tag) in enumerate(items):
                use_first = g == 0 and j == 0
                segs.append(_Seg(f_ids if use_first else n_ids, GROUP_IGNORE, text if use_first else "\n" + text, tag))
            if g == 0 and items:  # the code's first line follows the needle(s): a newline between
                segs.append(_Seg([self.p.newline], GROUP_IGNORE, "\n"))
            if g < n_units:
                segs.append(_Seg(ctx[cuts[g]:cuts[g + 1]], GROUP_LM, None))
        return segs

    def _finish(self, nprng: np.random.Generator, length: int, body: list[_Seg], task: str, meta: dict,
                answers: list[str], pad_front: bool) -> SynthSample:
        n_body = 1 + sum(len(s.ids) for s in body)
        if n_body > length:
            raise ValueError(f"length: {length} tokens is too short for a {task} sample ({n_body} tokens)")
        r = length - n_body if pad_front else 0
        ids = np.empty(r + n_body, dtype=np.int32)
        groups = np.zeros(r + n_body, dtype=np.uint8)
        if r > 0:
            ids[:r - 1] = self.corpus.window(nprng, r - 1)
            groups[:r - 1] = GROUP_LM
            ids[r - 1] = self.eos
        ids[r] = self.bos
        pos = r + 1
        prompt_end = None
        texts: list[str] = []
        spans: dict = {}
        for s in body:
            n = len(s.ids)
            ids[pos:pos + n] = s.ids
            groups[pos:pos + n] = s.group
            if s.tag is not None:
                spans.setdefault(s.tag, (pos, pos + n))
            if prompt_end is None:
                if s.group == GROUP_ANSWER:
                    prompt_end = pos
                elif self.with_text:
                    texts.append(s.text if s.text is not None else self.raw.decode([int(x) for x in s.ids]))
            pos += n
        meta = dict(meta, task=task, spans=spans, length=length)
        return SynthSample(ids=ids, groups=groups, prompt_start=r,
                           prompt_end=prompt_end if prompt_end is not None else pos, answers=answers,
                           prompt="".join(texts) if self.with_text else None, meta=meta)

    def _qa(self, template: str, keys: list[str], answers: list[str], first_sep: str, next_sep: str,
            answer_space: bool = True, answer_quote: bool = False, **extra) -> list[_Seg]:
        segs: list[_Seg] = []
        for i, (k, a) in enumerate(zip(keys, answers)):
            tpl = (first_sep if i == 0 else next_sep) + template
            cols = {"key": [k]}
            cols.update({n: [v[i]] for n, v in extra.items()})
            q_ids = self.p.render(tpl, **cols)[0]
            q_text = tpl.format(**{n: v[0] for n, v in cols.items()}) if self.with_text else None
            segs.append(_Seg(q_ids, GROUP_IGNORE, q_text, tag=("q", i)))
            if answer_quote:
                a_ids = self.p.lit(' "') + self.p.fields([a], space=False)[0] + self.p.lit('"')
                a_text = ' "' + a + '"'
            else:
                a_ids = self.p.fields([a], space=answer_space)[0]
                a_text = (" " if answer_space else "") + a
            segs.append(_Seg(a_ids, GROUP_ANSWER, a_text, tag=("a", i)))
        return segs

    # -------------------------------------------------------------- tasks
    def needle(self, rng: random.Random, nprng: np.random.Generator, length: int, *, haystack: str = "noise",
               n_needles: int = 1, n_questions: int = 1, key_kind: str = "words", value_kind: str = "number",
               depths: Sequence[float] | None = None, pad_front: bool = True) -> SynthSample:
        """needle: needles in a haystack (a pass key when n_needles == 1; RULER niah, arXiv 2404.06654).

        Layout (as ``sparsattn.eval.tasks``): ``PREAMBLE + "\\n" + context + "\\n" + QUESTION`` and
        `` value``; further questions about other needles follow after ``".\\n"``.

        Args:
            haystack: "noise" (the noise sentences joined by " "), "code" (train-corpus lines joined
                by "\\n", trained on as language modelling) or "needle" (the haystack is made of
                distractor needles, joined by "\\n"; questions ask about needles of it).
            n_needles: needles in a noise/code haystack (question 1 asks about needle 0).
            n_questions: questions in all (at most the number of needles).
            depths: per needle (per question for "needle"), the fraction of haystack units before
                it; uniform random when None. ``meta["gaps"]`` holds the unit index used.
            pad_front: fill to exactly ``length`` with corpus text + EOS before the BOS.
        """
        if haystack not in ("noise", "code", "needle"):
            raise ValueError(f"haystack: expected 'noise', 'code' or 'needle', got {haystack!r}")
        if value_kind == "number":
            pre, tpl, qtpl = PREAMBLE, NEEDLE_TEMPLATE, QUESTION_TEMPLATE
        elif value_kind == "uuid":
            pre, tpl, qtpl = PREAMBLE_UUID, NEEDLE_TEMPLATE_UUID, QUESTION_TEMPLATE_UUID
        else:
            raise ValueError(f"value_kind: expected 'number' or 'uuid', got {value_kind!r}")
        head = _Seg(self.p.lit(pre + "\n"), GROUP_IGNORE, pre + "\n")
        if haystack == "needle":
            return self._needle_haystack(rng, nprng, length, head, tpl, qtpl, n_questions, key_kind,
                                         value_kind, depths, pad_front)
        n_needles = max(1, int(n_needles))
        keys = self._distinct(rng, self._key, key_kind, n_needles)
        values = self._distinct(rng, self._value, value_kind, n_needles)
        if depths is None:
            depths = [rng.random() for _ in range(n_needles)]
        depths = [float(d) for d in depths]
        if len(depths) != n_needles or not all(0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths: expected {n_needles} floats in [0, 1], got {depths}")
        sep = " " if haystack == "noise" else "\n"
        enc_first = self.p.render(tpl, key=keys, value=values)
        enc_next = self.p.render(sep + tpl, key=keys, value=values)
        needles = [tpl.format(key=k, value=v) for k, v in zip(keys, values)]
        n_q = max(1, min(int(n_questions), n_needles))
        pick = [rng.random() for _ in range(n_q - 1)]
        while True:
            # question 1 asks about needle 0; the others about distinct random other needles
            asked = [0] + list(dict.fromkeys(1 + int(p * (n_needles - 1)) for p in pick if n_needles > 1))
            qa = self._qa(qtpl, [keys[i] for i in asked], [values[i] for i in asked], "\n", ".\n")
            fixed = 1 + len(head.ids) + sum(len(s.ids) for s in qa) + sum(len(x) for x in enc_next) + 2
            # short sequences: needles and questions take at most ~half of the length
            if n_needles == 1 or 2 * fixed <= length:
                break
            n_needles -= 1  # needle 0 always stays
            for lst in (keys, values, depths, needles, enc_first, enc_next):
                del lst[n_needles:]
        avail = length - fixed
        if haystack == "noise":
            n_units = self._noise_count(avail)
        else:
            ctx, bounds = self._code(nprng, avail)
            n_units = len(bounds) + 1 if len(ctx) else 0
        gaps = [min(n_units, max(0, int(round(d * n_units)))) for d in depths]
        inserts: dict = {}
        for i in sorted(range(n_needles), key=lambda i: (gaps[i], depths[i])):
            inserts.setdefault(gaps[i], []).append((enc_first[i], enc_next[i], needles[i], ("needle", i)))
        if haystack == "noise" or not n_units:
            context = self._noise_context(n_units, inserts)
        else:
            context = self._code_context(ctx, bounds, inserts)
        meta = {"haystack": haystack, "keys": keys, "values": values, "depths": depths, "gaps": gaps,
                "n_units": n_units, "asked": asked, "key_kind": key_kind, "value_kind": value_kind}
        s = self._finish(nprng, length, [head] + context + qa, "needle", meta, [values[i] for i in asked],
                         pad_front)
        s.meta["context_span"] = (s.prompt_start + 1 + len(head.ids), s.meta["spans"][("q", 0)][0])
        return s

    def _needle_haystack(self, rng, nprng, length, head, tpl, qtpl, n_questions, key_kind, value_kind,
                         depths, pad_front) -> SynthSample:
        """The haystack is distractor needles joined by "\\n" (RULER niah_multikey_2/3)."""
        budget = length - 2 - len(head.ids)
        n_q = max(1, int(n_questions))
        probe = self._qa(qtpl, [self._key(rng, key_kind)], [self._value(rng, value_kind)], "\n", ".\n")
        q_len = sum(len(s.ids) for s in probe) + 2
        avail = budget - q_len * n_q
        per = len(self.p.render("\n" + tpl, key=[self._key(rng, key_kind)], value=[self._value(rng, value_kind)])[0])
        est = max(2, int(avail / max(per - 2, 1)) + 4)
        keys = self._distinct(rng, self._key, key_kind, est)
        values = [self._value(rng, value_kind) for _ in range(est)]
        enc_first = self.p.render(tpl, key=keys[:1], value=values[:1])[0]
        enc_next = self.p.render("\n" + tpl, key=keys, value=values)
        total, n = len(enc_first), 1
        while n < est and total + len(enc_next[n]) <= avail:
            total += len(enc_next[n])
            n += 1
        if total > avail:
            raise ValueError(f"length: {length} tokens is too short for a needle-haystack sample")
        qd = [rng.random() for _ in range(n_q)] if depths is None else [float(d) for d in depths][:n_q]
        while True:
            picks = list(dict.fromkeys(min(n - 1, max(0, int(round(d * (n - 1))))) for d in qd))
            qa = self._qa(qtpl, [keys[i] for i in picks], [values[i] for i in picks], "\n", ".\n")
            if n == 1 or 2 + len(head.ids) + total + sum(len(x.ids) for x in qa) <= length:
                break
            n -= 1
            total -= len(enc_next[n])
        needles = [tpl.format(key=k, value=v) for k, v in zip(keys[:n], values[:n])]
        context = [_Seg(enc_first, GROUP_IGNORE, needles[0], ("needle", 0))]
        context += [_Seg(enc_next[i], GROUP_IGNORE, "\n" + needles[i], ("needle", i)) for i in range(1, n)]
        meta = {"haystack": "needle", "keys": keys[:n], "values": values[:n], "n_units": n, "asked": picks,
                "gaps": picks, "depths": [i / max(n - 1, 1) for i in picks], "key_kind": key_kind,
                "value_kind": value_kind}
        s = self._finish(nprng, length, [head] + context + qa, "needle", meta, [values[i] for i in picks],
                         pad_front)
        s.meta["context_span"] = (s.prompt_start + 1 + len(head.ids), s.meta["spans"][("q", 0)][0])
        return s

    def variable_tracking(self, rng: random.Random, nprng: np.random.Generator, length: int, *,
                          num_chains: int = 1, num_hops: int = 4, haystack: str = "noise",
                          pad_front: bool = True) -> SynthSample:
        """variable_tracking: chains ``VAR A = 12345``, ``VAR B = VAR A`` ... among haystack units
        (RULER vt, arXiv 2404.06654), layout as ``sparsattn.eval.tasks``; the answer is every
        variable of chain 0, in chain order, space-separated."""
        if haystack not in ("noise", "code"):
            raise ValueError(f"haystack: expected 'noise' or 'code', got {haystack!r}")
        if num_chains < 1 or num_hops < 0:
            raise ValueError(f"num_chains, num_hops: expected >= 1 and >= 0, got {num_chains}, {num_hops}")
        sep = " " if haystack == "noise" else "\n"
        names = self._distinct(rng, lambda r, _k: "".join(r.choices(string.ascii_uppercase, k=5)), "name",
                               num_chains * (num_hops + 1))
        values = self._distinct(rng, lambda r, _k: str(r.randint(10000, 99999)), "value", num_chains)
        stmts: list[tuple[str, str, str]] = []  # (template, a, b)
        fracs: list[float] = []
        for c in range(num_chains):
            vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
            stmts.append(("VAR {key} = {value}", vs[0], values[c]))
            stmts += [("VAR {key} = VAR {value}", vs[j + 1], vs[j]) for j in range(num_hops)]
            fracs += sorted(rng.random() for _ in range(num_hops + 1))
        enc_first = [self.p.render(t, key=[a], value=[b])[0] for t, a, b in stmts]
        enc_next = [self.p.render(sep + t, key=[a], value=[b])[0] for t, a, b in stmts]
        texts = [t.format(key=a, value=b) for t, a, b in stmts]
        head_text = VT_PREAMBLE + "\n\n"
        head = _Seg(self.p.lit(head_text), GROUP_IGNORE, head_text)
        answer = " ".join(names[:num_hops + 1])
        qa = self._qa(VT_QUESTION_TEMPLATE.replace("{value}", "{key}"), [values[0]], [answer], "\n", "\n",
                      num_v=[str(num_hops + 1)])
        avail = length - 3 - len(head.ids) - sum(len(s.ids) for s in qa) - sum(len(x) for x in enc_next)
        if haystack == "noise":
            n_units = self._noise_count(avail)
        else:
            ctx, bounds = self._code(nprng, avail)
            n_units = len(bounds) + 1 if len(ctx) else 0
        gaps = [min(n_units, max(0, int(round(f * n_units)))) for f in fracs]
        inserts: dict = {}
        for i in sorted(range(len(stmts)), key=lambda i: (gaps[i], fracs[i])):
            inserts.setdefault(gaps[i], []).append((enc_first[i], enc_next[i], texts[i], ("stmt", i)))
        if haystack == "noise" or not n_units:
            context = self._noise_context(n_units, inserts)
        else:
            context = self._code_context(ctx, bounds, inserts)
        meta = {"haystack": haystack, "names": names, "values": values, "fracs": fracs, "gaps": gaps,
                "num_chains": num_chains, "num_hops": num_hops, "n_units": n_units}
        return self._finish(nprng, length, [head] + context + qa, "variable_tracking", meta,
                            names[:num_hops + 1], pad_front)

    def kv(self, rng: random.Random, nprng: np.random.Generator, length: int, *, n_questions: int = 1,
           key_kind: str = "uuid", value_kind: str = "number", pad_front: bool = True) -> SynthSample:
        """kv: a JSON-like ``{"key": "value", ...}`` list, then ``Key: "k"`` asks for one value
        (key-value retrieval of "Lost in the Middle", Liu et al., arXiv 2307.03172)."""
        head_text = KV_PREAMBLE + "\n"
        head = _Seg(self.p.lit(head_text), GROUP_IGNORE, head_text)
        budget = length - 2 - len(head.ids)
        n_q = max(1, int(n_questions))
        probe_k, probe_v = self._key(rng, key_kind), self._value(rng, value_kind)
        probe = self._qa(KV_QUESTION_TEMPLATE, [probe_k], [probe_v], "\n", "\n", answer_quote=True)
        avail = budget - (sum(len(s.ids) for s in probe) + 2) * n_q - 2
        per = len(self.p.render(' "{key}": "{value}",', key=[probe_k], value=[probe_v])[0])
        est = max(2, int(avail / max(per - 2, 1)) + 4)
        keys = self._distinct(rng, self._key, key_kind, est)
        values = [self._value(rng, value_kind) for _ in range(est)]
        mid = self.p.render(' "{key}": "{value}",', key=keys, value=values)
        total, n = 0, 0
        while n < est and total + len(mid[n]) <= avail:
            total += len(mid[n])
            n += 1
        if n < 1:
            raise ValueError(f"length: {length} tokens is too short for a kv sample")
        draws = [rng.random() for _ in range(n_q)]
        while True:
            picks = list(dict.fromkeys(int(d * n) for d in draws))
            qa = self._qa(KV_QUESTION_TEMPLATE, [keys[i] for i in picks], [values[i] for i in picks], "\n", "\n",
                          answer_quote=True)
            if n == 1 or 4 + len(head.ids) + total + sum(len(x.ids) for x in qa) <= length:
                break
            n -= 1
            total -= len(mid[n])
        if n == 1:
            tpls = ['{{"{key}": "{value}"}}']
        else:
            tpls = ['{{"{key}": "{value}",'] + [' "{key}": "{value}",'] * (n - 2) + [' "{key}": "{value}"}}']
        ids = [self.p.render(tpls[0], key=keys[:1], value=values[:1])[0]] + mid[1:n - 1]
        if n > 1:
            ids.append(self.p.render(tpls[-1], key=keys[n - 1:n], value=values[n - 1:n])[0])
        context = [_Seg(x, GROUP_IGNORE, t.format(key=k, value=v), ("pair", i))
                   for i, (x, t, k, v) in enumerate(zip(ids, tpls, keys, values))]
        meta = {"keys": keys[:n], "values": values[:n], "asked": picks, "n_pairs": n}
        return self._finish(nprng, length, [head] + context + qa, "kv", meta, [values[i] for i in picks],
                            pad_front)

    # -------------------------------------------------------------- mixture
    def sample(self, rng: random.Random, nprng: np.random.Generator, length: int) -> SynthSample:
        """sample: one sample of exactly ``length`` tokens from the task mixture (random settings).

        Below 1024 tokens a setting that does not fit (e.g. a haystack of long UUID needles)
        falls back to a single pass key in noise.
        """
        try:
            return self._sample(rng, nprng, length)
        except ValueError:
            if length >= 1024:
                raise
            return self.needle(rng, nprng, length, haystack="noise", n_needles=1)

    def _sample(self, rng: random.Random, nprng: np.random.Generator, length: int) -> SynthSample:
        task = rng.choices(self.tasks, weights=self.probs)[0]
        key_kind = rng.choices(["words", "uuid", "number"], weights=[0.5, 0.25, 0.25])[0]
        short = length < 512
        if task == "passkey":
            hay = "noise" if rng.random() < 0.6 else "code"
            return self.needle(rng, nprng, length, haystack=hay, n_needles=1, key_kind=key_kind)
        if task == "multikey":
            hay = rng.choices(["needle", "noise", "code"], weights=[0.4, 0.35, 0.25])[0]
            value_kind = "number" if rng.random() < 0.8 else "uuid"
            return self.needle(rng, nprng, length, haystack=hay, n_needles=rng.randint(2, 3 if short else 8),
                               n_questions=rng.randint(1, 2 if short else 3), key_kind=key_kind,
                               value_kind=value_kind)
        if task == "variable_tracking":
            hay = "noise" if rng.random() < 0.8 else "code"
            return self.variable_tracking(rng, nprng, length, num_chains=1 if short else rng.randint(1, 2),
                                          num_hops=rng.randint(1, 2 if short else 4), haystack=hay)
        return self.kv(rng, nprng, length, n_questions=rng.randint(1, 2 if short else 3),
                       key_kind=rng.choice(["uuid", "words", "number"]),
                       value_kind="number" if rng.random() < 0.7 else "uuid")


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------

class BatchMaker:
    """BatchMaker: deterministic training batches of ``batch_size`` sequences of ``seq_len + 1`` tokens.

    A fraction ``retrieval_share`` (rounded per batch, at least one sequence when > 0) of the rows
    are synthetic retrieval samples, the rest corpus windows (loss group 1 on every target except
    BOS). Rows are shuffled so the position of synthetic rows varies.
    """

    def __init__(self, corpus: Corpus, tasks: RetrievalTasks | None, *, seq_len: int, batch_size: int,
                 retrieval_share: float, seed: int, bos_id: int):
        if seq_len < 16 or batch_size < 1:
            raise ValueError(f"seq_len, batch_size: expected >= 16 and >= 1, got {seq_len}, {batch_size}")
        if not 0.0 <= retrieval_share <= 1.0:
            raise ValueError(f"retrieval_share: expected a float in [0, 1], got {retrieval_share}")
        if retrieval_share > 0 and tasks is None:
            raise ValueError("tasks: needed when retrieval_share > 0")
        self.corpus, self.tasks = corpus, tasks
        self.seq_len, self.batch_size, self.share, self.seed = seq_len, batch_size, retrieval_share, seed
        self.bos_id = int(bos_id)

    def batch(self, index: int) -> dict:
        s = _seed_of("batch", self.seed, self.seq_len, index)
        rng = random.Random(s)
        nprng = np.random.default_rng(s)
        n = self.seq_len + 1
        tokens = np.empty((self.batch_size, n), dtype=np.int32)
        groups = np.empty((self.batch_size, n), dtype=np.uint8)
        n_syn = int(round(self.share * self.batch_size))
        if self.share > 0:
            n_syn = max(1, n_syn)
        rows = list(range(self.batch_size))
        rng.shuffle(rows)
        for j, r in enumerate(rows):
            if j < n_syn:
                smp = self.tasks.sample(rng, nprng, n)
                tokens[r], groups[r] = smp.ids, smp.groups
            else:
                tokens[r] = self.corpus.window(nprng, n)
                groups[r] = GROUP_LM
                groups[r][tokens[r] == self.bos_id] = GROUP_IGNORE
        groups[:, 0] = GROUP_IGNORE  # never a target
        return {"tokens": tokens, "groups": groups}


try:  # torch is a dependency of the package; the import is here so numpy-only use stays possible
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:  # pragma: no cover
    _IterableDataset = object


class BatchStream(_IterableDataset):
    """BatchStream: infinite stream of ``BatchMaker`` batches as torch tensors for a ``DataLoader``.

    With W workers, worker w yields batches w, w + W, w + 2W, ...; the loader's round robin then
    delivers batches 0, 1, 2, ... in order (deterministic). Use ``batch_size=None`` in the loader.
    ``tokenizer_json`` (``Tokenizer.to_str()``) rebuilds the tokenizer inside each worker.
    """

    def __init__(self, corpus: Corpus, tokenizer_json: str, *, seq_len: int, batch_size: int,
                 retrieval_share: float, seed: int, bos_id: int, eos_id: int, mix: dict | None = None,
                 start: int = 0):
        self.corpus, self.tokenizer_json = corpus, tokenizer_json
        self.kw = dict(seq_len=seq_len, batch_size=batch_size, retrieval_share=retrieval_share, seed=seed)
        self.bos_id, self.eos_id, self.mix, self.start = bos_id, eos_id, mix, start

    def maker(self) -> BatchMaker:
        from tokenizers import Tokenizer

        raw = Tokenizer.from_str(self.tokenizer_json)
        tasks = RetrievalTasks(raw, self.corpus, bos_id=self.bos_id, eos_id=self.eos_id, mix=self.mix)
        return BatchMaker(self.corpus, tasks, bos_id=self.bos_id, **self.kw)

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        maker = self.maker()
        i = self.start + wid
        while True:
            b = maker.batch(i)
            yield {k: torch.from_numpy(v) for k, v in b.items()}
            i += nw


def iter_texts(paths: Iterable[Path]) -> Iterable[str]:
    from ..data import read_source_text
    for p in paths:
        yield read_source_text(p)
