"""mkdocs hooks for the sparsattn site (``hooks:`` in mkdocs.yml).

``on_page_markdown`` expands the marker ``<!-- sparsattn:method-files -->`` into one mkdocstrings
block per public module of ``sparsattn/methods/`` (the same rule the registry uses to import them:
every ``*.py`` but ``base`` and ``_private``), so the API reference lists every method without a
hand-kept list.
"""
from __future__ import annotations

from pathlib import Path

MARKER = "<!-- sparsattn:method-files -->"
METHODS_DIR = Path(__file__).resolve().parents[1] / "sparsattn" / "methods"


def method_modules() -> list[str]:
    """Sorted module names of the method files (``sparsattn.methods.<name>``)."""
    return sorted(f"sparsattn.methods.{p.stem}" for p in METHODS_DIR.glob("*.py")
                  if p.stem != "base" and not p.stem.startswith("_"))


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace the marker with ``::: sparsattn.methods.<name>`` blocks (heading level 2)."""
    if MARKER not in markdown:
        return markdown
    blocks = "\n\n".join(f"::: {m}\n    options:\n      show_root_heading: true\n      heading_level: 2"
                         for m in method_modules())
    return markdown.replace(MARKER, blocks)
