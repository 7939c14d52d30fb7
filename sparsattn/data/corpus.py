"""Corpus: the Python source files of this installation (standard library and site-packages).

These files are real, varied text that exists on every machine that can run the library, so the
bundled model trains on them and the evaluation harness draws held-out haystacks from them.
The split is a deterministic hash of the file's path relative to its root, so training and
evaluation agree on it on any machine: about 1 file in 20 is held out.
"""
from __future__ import annotations

import hashlib
import site
import sysconfig
from pathlib import Path

_HELDOUT_MODULUS = 20


def _roots() -> list[Path]:
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for p in list(site.getsitepackages()) + [sysconfig.get_paths()["purelib"]]:
        path = Path(p)
        if path.is_dir() and path not in roots:
            roots.append(path)
    return roots


def walk_files(roots: list[Path], pattern: str, *, min_bytes: int, max_bytes: int, accept=None):
    """walk_files: ``(root, path)`` of every regular file matching ``pattern`` under each root (sorted),
    each real file once, of ``min_bytes..max_bytes`` bytes, for which ``accept(path)`` (default: all)
    holds; unreadable files are skipped."""
    seen: set[Path] = set()
    for root in roots:
        for path in sorted(root.rglob(pattern)):
            if accept is not None and not accept(path):
                continue
            try:
                if not path.is_file():
                    continue
                real = path.resolve()
                size = path.stat().st_size
            except OSError:
                continue
            if real in seen or not (min_bytes <= size <= max_bytes):
                continue
            seen.add(real)
            yield root, path


def _is_heldout(rel: str) -> bool:
    digest = hashlib.sha1(rel.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") % _HELDOUT_MODULUS == 0


def source_files(split: str = "train", *, roots: list[Path] | None = None,
                 min_bytes: int = 512, max_bytes: int = 400_000) -> list[Path]:
    """source_files: sorted list of local ``.py`` files in the requested split.

    Args:
        split: ``"train"`` (about 95% of files), ``"heldout"`` (the rest) or ``"all"``.
        roots: directories to scan; default the standard library and site-packages.
        min_bytes, max_bytes: files outside this size range are skipped (stubs, generated blobs).
    Raises:
        ValueError: unknown split, or no file found under the roots.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split: expected 'train', 'heldout' or 'all', got {split!r}")
    roots = [Path(r) for r in (roots or _roots())]
    out = [path for root, path in walk_files(roots, "*.py", min_bytes=min_bytes, max_bytes=max_bytes)
           if split == "all" or (split == "heldout") == _is_heldout(path.relative_to(root).as_posix())]
    if not out:
        raise ValueError(f"roots: no .py files of split {split!r} found under {[str(r) for r in roots]}")
    return out


def read_source_text(path: Path) -> str:
    """read_source_text: a source file's text, undecodable bytes replaced, tabs kept."""
    return Path(path).read_text(encoding="utf-8", errors="replace")
