"""sparsattn.data.prose: documentation text of the installation as a prose haystack (issue 21: needles
in text that is neither source code nor a training template)."""
from __future__ import annotations

import pytest

from sparsattn.data import is_prose_line, prose_files, prose_lines
from sparsattn.eval import tasks as T


@pytest.mark.parametrize("line,ok", [
    ("The library has optional extensions for speed, and a pure fallback as well.", True),
    ("    indented code that looks like words in a sentence of some length", False),
    ("x = compute(a, b)  # assignment of the result to a variable name here", False),
    ("| a | table | row | with | cells | and | more | words | here |", False),
    ("Short line.", False),
    ("- a bullet item with enough words to pass the length and word counts", False),
    ("See https://example.org/docs/index.html for the reference of every option", True),
])
def test_is_prose_line(line, ok):
    assert is_prose_line(line) is ok


def test_prose_lines_skip_metadata_headers_and_code_fences(tmp_path):
    d = tmp_path / "pkg-1.0.dist-info"
    d.mkdir()
    body = ("Metadata-Version: 2.1\nName: pkg\nSummary: This summary header line is not part of the text body\n\n"
            "The package reads documents and writes them back in a canonical order for readers.\n"
            "```python\nThis line sits inside a fenced block and must be dropped from the text.\n```\n"
            "A second paragraph explains how the options interact with the command line tool.\n")
    (d / "METADATA").write_text(body)
    (tmp_path / "notes.rst").write_text("Plain words make up this line of the notes about the project here.\n")
    (tmp_path / "RECORD").write_text("The record file lists installed files and is never used as prose text.\n")
    (tmp_path / "sparsattn-0.1.dist-info").mkdir()
    (tmp_path / "sparsattn-0.1.dist-info" / "METADATA").write_text(body)
    files = prose_files([tmp_path], min_bytes=1)
    assert sorted(f.name for f in files) == ["METADATA", "notes.rst"]
    assert all("sparsattn-" not in str(f) for f in files)  # this library's own README is not a haystack
    meta = next(f for f in files if f.name == "METADATA")
    assert prose_lines(meta) == [
        "The package reads documents and writes them back in a canonical order for readers.",
        "A second paragraph explains how the options interact with the command line tool."]
    with pytest.raises(ValueError, match="roots"):
        prose_files([tmp_path / "missing"])


def test_passkey_prose_haystack(bpe_tok, monkeypatch, tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.md").write_text("\n".join(
            f"Document {i} paragraph {j} describes how the reader should configure the service today."
            for j in range(20)))
    files = tuple(prose_files([tmp_path], min_bytes=1))
    monkeypatch.setattr(T._base, "_prose_files", lambda: files)
    length = 3000
    s = T.passkey(bpe_tok, length, 0.4, seed=3, haystack="prose")
    n = T.count_tokens(bpe_tok, s.prompt)
    assert 0.9 * length <= n <= length
    assert s.prompt.count(s.meta["value"]) == 1 and s.answers == [s.meta["value"]]
    c = s.meta["needle_char"]
    assert s.prompt[c:c + len(s.meta["needle"])] == s.meta["needle"]
    assert "describes how the reader" in s.prompt and "\ndef " not in s.prompt
    # the same seed gives the same prompt; another seed another file order
    assert T.passkey(bpe_tok, length, 0.4, seed=3, haystack="prose").prompt == s.prompt
    with pytest.raises(ValueError, match="haystack"):
        T.passkey(bpe_tok, length, 0.4, seed=3, haystack="poetry")


def test_installation_has_prose():
    """An environment with the test extras has enough documentation text for a few 8K-token haystacks
    (about 4 characters a token: 32 000 characters a prompt)."""
    chars = 0
    for f in prose_files():
        chars += sum(len(x) for x in prose_lines(f))
        if chars > 100_000:
            break
    assert chars > 100_000
