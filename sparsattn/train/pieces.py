"""train.pieces: token ids of prompt pieces, assembled without re-tokenizing long text (``Pieces``)."""
from __future__ import annotations

from typing import Sequence

from .corpus import encode_many


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
