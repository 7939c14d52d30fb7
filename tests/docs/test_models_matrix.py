"""docs/models.md claims only families the integration tests build (issue 16, item 6): every family
in the matrix's first column is a model family name used in ``tests/integrations``."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def matrix_families() -> list[str]:
    """The backticked family names at the start of the matrix rows of docs/models.md."""
    rows = [l for l in (ROOT / "docs" / "models.md").read_text().splitlines() if l.startswith("| `")]
    return [re.match(r"\| `([a-z0-9_]+)`", l).group(1) for l in rows]


def test_every_family_in_the_matrix_is_tested():
    fams = matrix_families()
    assert len(fams) >= 5, fams
    tests = "\n".join(p.read_text() for p in (ROOT / "tests" / "integrations").glob("*.py"))
    untested = [f for f in fams if f'"{f}"' not in tests]
    assert not untested, f"docs/models.md lists families no integration test builds: {untested}"
