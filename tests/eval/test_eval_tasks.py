"""Tests of sparsattn.eval.tasks: answers where meta says, token length in range, determinism."""
from __future__ import annotations

import re

import pytest

from sparsattn.eval import tasks as T
from sparsattn.eval.scoring import SCORERS

TOKENIZERS = ["byte_tok", "bpe_tok", "hf_tok"]


def _tok(request, name):
    return request.getfixturevalue(name)


def _check_length(sample, tok, length):
    n = T.count_tokens(tok, sample.prompt)
    assert n == sample.meta["n_tokens"]
    assert n <= length
    assert n >= 0.9 * length


def _check_needle(sample, tok):
    m = sample.meta
    needle = m["needle"]
    assert needle == T.NEEDLE_TEMPLATE.format(key=m["key"], value=m["value"]) or m["value_kind"] == "uuid"
    c = m["needle_char"]
    assert sample.prompt[c:c + len(needle)] == needle
    assert sample.prompt.count(m["value"]) == 1
    assert sample.answers == [m["value"]]
    # the reported token offset is the token count of the prefix before the needle
    assert m["needle_token"] == T.count_tokens(tok, sample.prompt[:c])
    assert abs(m["depth_actual"] - m["depth"]) <= 1.0 / max(m["n_units"], 1) + 1e-9
    assert m["needle_unit"] == round(m["depth"] * m["n_units"])
    assert sample.prompt.startswith(T.PREAMBLE if m["value_kind"] == "number" else T.PREAMBLE_UUID)
    question = (T.QUESTION_TEMPLATE if m["value_kind"] == "number" else T.QUESTION_TEMPLATE_UUID)
    assert sample.prompt.endswith("\n" + question.format(key=m["key"]))


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_noise(request, tok_name, depth):
    tok = _tok(request, tok_name)
    length = 3000
    s = T.passkey(tok, length, depth, seed=11)
    _check_length(s, tok, length)
    _check_needle(s, tok)
    assert re.fullmatch(r"\d{7}", s.answers[0])
    # the haystack is the noise sentences and nothing else
    hay = s.prompt[len(T.PREAMBLE) + 1: s.prompt.rindex("\n")].replace(s.meta["needle"], "")
    assert set(re.split(r"(?<=\.)\s+", hay.strip())) <= set(T.NOISE_SENTENCES)


def test_passkey_byte_offsets_exact(byte_tok):
    s = T.passkey(byte_tok, 5000, 0.5, seed=3)
    c = s.meta["needle_char"]
    assert s.meta["needle_token"] == len(s.prompt[:c].encode())
    # depth in characters is close to 0.5 of the haystack
    head = len(T.PREAMBLE) + 1
    tail = len(s.prompt) - s.prompt.rindex("\n")
    frac = (c - head) / (len(s.prompt) - head - tail - len(s.meta["needle"]))
    assert abs(frac - 0.5) < 0.02


@pytest.mark.parametrize("key_kind", ["words", "uuid", "number"])
def test_passkey_key_kinds(bpe_tok, key_kind):
    s = T.passkey(bpe_tok, 2000, 0.5, seed=5, key_kind=key_kind)
    key = s.meta["key"]
    if key_kind == "words":
        assert re.fullmatch(r"[a-z]+-[a-z]+", key)
    elif key_kind == "uuid":
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", key)
    else:
        assert re.fullmatch(r"\d{7}", key) and key != s.meta["value"]
    _check_needle(s, bpe_tok)


@pytest.fixture()
def small_corpus(monkeypatch):
    """A few real source files in place of the (slow to list) held-out corpus."""
    import json
    import pathlib
    files = tuple(sorted(pathlib.Path(json.__file__).parent.glob("*.py"))) + \
        tuple(sorted(pathlib.Path(T.__file__).parent.glob("*.py")))
    monkeypatch.setattr(T._base, "_heldout_files", lambda: files)
    return files


def test_passkey_code_haystack(bpe_tok, small_corpus):
    length = 4000
    s = T.passkey(bpe_tok, length, 0.6, seed=2, haystack="code")
    _check_length(s, bpe_tok, length)
    _check_needle(s, bpe_tok)
    c = s.meta["needle_char"]
    # inserted at a line boundary, as its own line
    assert s.prompt[c - 1] == "\n" and s.prompt[c + len(s.meta["needle"])] == "\n"
    assert "def " in s.prompt or "import " in s.prompt or "class " in s.prompt


@pytest.mark.parametrize("tok_name", ["byte_tok", "bpe_tok"])
@pytest.mark.parametrize("haystack,key_kind,value_kind", [
    ("needle", "words", "number"), ("needle", "uuid", "uuid"), ("noise", "words", "number")])
def test_multikey(request, tok_name, haystack, key_kind, value_kind):
    tok = _tok(request, tok_name)
    length = 3000
    s = T.multikey_needle(tok, length, 0.25, seed=4, haystack=haystack, key_kind=key_kind,
                          value_kind=value_kind)
    _check_length(s, tok, length)
    _check_needle(s, tok)
    needle_re = (T.NEEDLE_TEMPLATE if value_kind == "number" else T.NEEDLE_TEMPLATE_UUID)
    needle_re = re.escape(needle_re).replace(r"\{key\}", "(.+?)").replace(r"\{value\}", "(.+?)")
    found = re.findall(needle_re + r"(?=\s|$)", s.prompt)
    keys = [k for k, _ in found]
    assert keys.count(s.meta["key"]) == 1
    if haystack == "needle":
        assert len(found) >= 5  # the haystack is made of distractor needles
    else:
        assert len(found) == 4 and s.meta["n_distractors"] == 3
        for off in s.meta["distractor_chars"]:
            assert s.prompt[off:].startswith("One of the special magic numbers for ")


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_variable_tracking(request, tok_name):
    tok = _tok(request, tok_name)
    length = 3000
    s = T.variable_tracking(tok, length, seed=8, num_chains=2, num_hops=3)
    _check_length(s, tok, length)
    names = s.answers
    assert len(names) == 4 and len(set(names)) == 4
    value = s.meta["value"]
    stmts = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(3)]
    offs = s.meta["statement_chars"]
    assert offs == sorted(offs)
    for off, st in zip(offs, stmts):
        assert s.prompt[off:off + len(st)] == st
    # following the chain from the value in the text recovers exactly the answers
    bound = {value}
    changed = True
    while changed:
        changed = False
        for a, b in re.findall(r"VAR ([A-Z]{5}) = (?:VAR )?([A-Z]{5}|\d{5})", s.prompt):
            if b in bound and a not in bound:
                bound.add(a)
                changed = True
    assert bound - {value} == set(names)
    assert len(re.findall(r"VAR [A-Z]{5} = ", s.prompt)) == 8  # the distractor chain is there too


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("length", [3000, 12000])
def test_common_words(request, tok_name, length):
    tok = _tok(request, tok_name)
    s = T.common_words(tok, length, seed=1)
    _check_length(s, tok, length)
    listing = s.prompt.rsplit(T.CWE_PREAMBLE + "\n", 1)[1].split("\nQuestion:")[0]
    words = re.findall(r"\d+\. (\S+)", listing)
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=lambda w: -counts[w])
    assert len(s.answers) == 10
    assert set(top[:10]) == set(s.answers)
    assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    # numbered 1..n in order
    assert [int(i) for i in re.findall(r"(\d+)\. ", listing)] == list(range(1, len(words) + 1))


def test_common_words_long_uses_compounds(byte_tok):
    s = T.common_words(byte_tok, 60000, seed=2)
    _check_length(s, byte_tok, 60000)
    assert s.meta["n_words"] > len(T._words.SINGLE_WORDS)


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_frequent_words(request, tok_name):
    tok = _tok(request, tok_name)
    length = 4000
    s = T.frequent_words(tok, length, seed=6)
    _check_length(s, tok, length)
    body = s.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
    counts = {}
    for w in body.split():
        counts[w] = counts.get(w, 0) + 1
    ranked = sorted((w for w in counts if w != "..."), key=lambda w: -counts[w])
    assert ranked[:3] == s.answers
    assert counts[s.answers[2]] > counts[ranked[3]]
    assert counts["..."] > counts[s.answers[0]]
    assert [counts[a] for a in s.answers] == s.meta["counts"]


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_determinism_and_seeds(byte_tok, task):
    a = T.make_samples(task, byte_tok, 2500, 2, seed=7, progress=False)
    b = T.make_samples(task, byte_tok, 2500, 2, seed=7, progress=False)
    c = T.make_samples(task, byte_tok, 2500, 2, seed=8, progress=False)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert [x.answers for x in a] == [x.answers for x in b]
    assert a[0].prompt != a[1].prompt  # samples within a set differ
    assert [x.prompt for x in a] != [x.prompt for x in c]
    assert a[0].answers != c[0].answers


def test_make_samples_depth_sweep(byte_tok):
    ss = T.make_samples("passkey", byte_tok, 2000, 5, seed=0, progress=False)
    assert [s.meta["depth"] for s in ss] == [0.0, 0.25, 0.5, 0.75, 1.0]
    ss = T.make_samples("passkey", byte_tok, 2000, 3, seed=0, depth=0.3, progress=False)
    assert all(s.meta["depth"] == 0.3 for s in ss)
    with pytest.raises(ValueError, match="depth"):
        T.make_samples("common_words", byte_tok, 2000, 2, seed=0, depth=0.3, progress=False)


def test_unknown_task_lists_names(byte_tok):
    with pytest.raises(ValueError) as e:
        T.get_task("needle_in_haystack")
    for name in T.TASKS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="passkey"):
        T.make_samples("nope", byte_tok, 1000, 1, seed=0)


def test_bad_arguments(byte_tok):
    with pytest.raises(ValueError, match="depth"):
        T.passkey(byte_tok, 2000, 1.5, seed=0)
    with pytest.raises(ValueError, match="length"):
        T.passkey(byte_tok, 0, 0.5, seed=0)
    with pytest.raises(ValueError, match="length"):
        T.passkey(byte_tok, 100, 0.5, seed=0)  # shorter than the fixed text
    with pytest.raises(ValueError, match="haystack"):
        T.passkey(byte_tok, 2000, 0.5, seed=0, haystack="essay")
    with pytest.raises(ValueError, match="key_kind"):
        T.passkey(byte_tok, 2000, 0.5, seed=0, key_kind="emoji")
    with pytest.raises(ValueError, match="tokenizer"):
        T.count_tokens(object(), "abc")


def test_count_tokens_adapters(bpe_tok, hf_tok, ws_tok):
    text = "The grass is green. " * 3
    n_raw = len(bpe_tok.encode(text).ids)
    assert T.count_tokens(bpe_tok, text) == n_raw
    assert T.count_tokens(hf_tok, text) == len(hf_tok.encode(text))
    assert T.encode_ids(bpe_tok, text, add_special_tokens=False) == bpe_tok.encode(text, add_special_tokens=False).ids
    assert T.count_tokens(ws_tok, text) == 12


def test_whitespace_tokenizer(ws_tok):
    s = T.passkey(ws_tok, 1500, 0.5, seed=1)
    _check_length(s, ws_tok, 1500)
    _check_needle(s, ws_tok)


def test_scorers_cover_tasks():
    assert set(SCORERS) == set(T.TASKS)


def test_variable_tracking_code_and_multikey_code(bpe_tok, small_corpus):
    s = T.variable_tracking(bpe_tok, 3000, seed=1, haystack="code")
    _check_length(s, bpe_tok, 3000)
    for off, name in zip(s.meta["statement_chars"], s.answers):
        assert s.prompt[off:].startswith(f"VAR {name} = ")
        assert s.prompt[off - 1] == "\n"  # own line
    m = T.multikey_needle(bpe_tok, 3000, 0.8, seed=1, haystack="code", n_keys=3)
    _check_length(m, bpe_tok, 3000)
    _check_needle(m, bpe_tok)
    assert m.meta["n_distractors"] == 2
