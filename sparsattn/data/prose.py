"""Prose: English documentation text already on the machine (package descriptions and READMEs of the
installation), for haystacks that are neither source code nor a training template.

The bundled model is trained on the installation's ``.py`` files and on synthetic retrieval
templates (``sparsattn/models/bundled/README.md``); the text files read here (the long description
in every ``*.dist-info/METADATA``, and ``.md`` / ``.rst`` / ``.txt`` files) are never part of its
training or of any calibration, so a needle hidden in them tests retrieval on text the model never
saw (issue 21's protocol). Only lines that read as prose are kept (``is_prose_line``): code blocks,
tables, headers and markup are dropped. Nothing is downloaded: which files exist depends on the
installed packages, so prompts built from this corpus are reproducible on one environment, not
across environments (the environment record of a run says which).
"""
from __future__ import annotations

import re
from pathlib import Path

from .corpus import _roots, walk_files

PROSE_SUFFIXES = (".md", ".rst", ".txt")
#: text files that are lists, not prose (dist-info bookkeeping, requirement pins)
_SKIP_NAMES = {"RECORD", "WHEEL", "INSTALLER", "REQUESTED", "entry_points.txt", "top_level.txt",
               "requirements.txt", "dependency_links.txt", "SOURCES.txt", "namespace_packages.txt"}
_WORD = re.compile(r"[A-Za-z]+")


def _is_doc(path: Path) -> bool:
    """A documentation text file: a dist-info ``METADATA`` or a ``.md`` / ``.rst`` / ``.txt`` file, not a
    bookkeeping list and not this library's own README."""
    if path.name in _SKIP_NAMES or path.parent.name.startswith("sparsattn-"):
        return False
    if path.name == "METADATA" and path.parent.name.endswith(".dist-info"):
        return True
    return path.suffix.lower() in PROSE_SUFFIXES


def prose_files(roots: list[Path] | None = None, *, min_bytes: int = 256, max_bytes: int = 400_000) -> list[Path]:
    """prose_files: sorted list of the installation's documentation text files (``*.dist-info/METADATA``,
    ``.md``, ``.rst``, ``.txt``) under ``roots`` (default: the standard library and site-packages).

    Raises:
        ValueError: no such file under the roots.
    """
    roots = [Path(r) for r in (roots or _roots())]
    out = [path for _, path in walk_files(roots, "*", min_bytes=min_bytes, max_bytes=max_bytes, accept=_is_doc)]
    if not out:
        raise ValueError(f"roots: no documentation text files (METADATA, {', '.join(PROSE_SUFFIXES)}) found under "
                         f"{[str(r) for r in roots]}")
    return out


def is_prose_line(line: str, *, min_chars: int = 40, max_chars: int = 240, min_words: int = 6) -> bool:
    """is_prose_line: True for a line that reads as running English text: ``min_chars..max_chars``
    characters, at least ``min_words`` words, at least 85% letters, spaces and sentence punctuation,
    not indented (code in Markdown / reST) and no code or markup characters."""
    s = line.strip()
    if not (min_chars <= len(s) <= max_chars) or line[:1] in (" ", "\t"):
        return False
    if any(c in s for c in "{}[]<>=|#*`$\\_@~^") or s.startswith(("-", "+", ":", "..", ">>>")):
        return False
    if len(_WORD.findall(s)) < min_words:
        return False
    ok = sum(ch.isalpha() or ch in " ,.;:'\"!?()-" for ch in s)
    return ok >= 0.85 * len(s)


def prose_lines(path: Path) -> list[str]:
    """prose_lines: the prose lines of one documentation file (``is_prose_line``), in file order; the
    header block of a ``METADATA`` file and fenced code blocks are skipped; unreadable files give []."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    lines = text.splitlines()
    if Path(path).name == "METADATA":  # RFC 822 headers, then a blank line, then the description
        try:
            lines = lines[lines.index("") + 1:]
        except ValueError:
            return []
    out, fenced = [], False
    for ln in lines:
        if ln.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced and is_prose_line(ln):
            out.append(ln.strip())
    return out
