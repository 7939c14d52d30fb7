"""train.haystack: the parts every synthetic retrieval sample is assembled from.

``SynthSample`` (one sequence of exactly the requested length with its loss groups and prompt span)
and ``SampleBuilder``, the base of ``RetrievalTasks``: random keys and values, noise and code
haystacks with needles inserted at token level, question/answer segments, and the final sample
(front filler from the corpus, BOS, loss groups). The state it reads (``p``, ``corpus``, ``bos``,
``eos``, ``with_text``, the noise and newline tables) is set by ``RetrievalTasks.__init__``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from ..eval.tasks import NOISE_SENTENCES
from ..eval.tasks._base import _random_key, _random_value
from .corpus import GROUP_ANSWER, GROUP_IGNORE, GROUP_LM
from .pieces import _Seg


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


class SampleBuilder:
    """SampleBuilder: random draws, haystacks, questions/answers and sample assembly shared by the
    synthetic retrieval tasks (see the module docstring; ``RetrievalTasks`` sets the state)."""

    # -------------------------------------------------------------- random draws
    # the evaluation's draws, so training keys and values look exactly like the evaluated ones
    _key = staticmethod(_random_key)
    _value = staticmethod(_random_value)

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

    def _haystack_with(self, nprng: np.random.Generator, haystack: str, avail: int, fracs, items) -> tuple:
        """(context segments, gaps, n_units) of a ``haystack`` ("noise" sentences or "code" lines)
        filling about ``avail`` tokens, with ``items[i]`` (first ids, next ids, text, tag) inserted
        ``fracs[i]`` of the way in (unit gap ``round(fracs[i] * n_units)``; ties in order of fraction)."""
        if haystack == "noise":
            n_units, ctx, bounds = self._noise_count(avail), None, None
        else:
            ctx, bounds = self._code(nprng, avail)
            n_units = len(bounds) + 1 if len(ctx) else 0
        gaps = [min(n_units, max(0, int(round(f * n_units)))) for f in fracs]
        inserts: dict = {}
        for i in sorted(range(len(items)), key=lambda i: (gaps[i], fracs[i])):
            inserts.setdefault(gaps[i], []).append(items[i])
        if haystack == "noise" or not n_units:
            return self._noise_context(n_units, inserts), gaps, n_units
        return self._code_context(ctx, bounds, inserts), gaps, n_units

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
