"""Import direction: every ``sparsattn`` module imports only from its own layer or layers below.

Layers (low -> high), decided from the tree (issue 11):

0. ``patterns``, ``calibration`` (checked file loader), ``data``, ``models`` (local checkpoints),
   ``_environment`` (the one environment record of result files)
1. ``kernels`` (take a Pattern), then ``api`` (backend dispatch over the kernel families)
2. ``methods``, ``nn``, ``kv`` (methods and layers built on kernels; ``nn`` <-> ``methods`` share
   helpers, ``methods`` use ``kv`` storage helpers)
3. ``integrations``, ``capture``, ``distributed`` (route tensors of a model through methods)
4. ``calibrate``, ``eval``, ``bench``, ``analysis``, ``train`` (drive whole models)
5. ``cli``, ``demo`` (and its prefill timing ``demo_speed``), ``evaluate``

The package root ``sparsattn/__init__.py`` re-exports layers <= 3 and counts as layer 3.

Imports are read with ``ast`` (module-level and function-level alike). ``KNOWN_UPWARD`` lists the
upward imports still in the tree (each to be removed; the test fails when one disappears so the
list is kept honest, and on any new one).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sparsattn"
LAYER = {
    "patterns": 0, "calibration": 0, "data": 0, "models": 0, "_environment": 0, "_files": 0,
    "kernels": 1, "api": 1,
    "methods": 2, "nn": 2, "kv": 2,
    "integrations": 3, "capture": 3, "distributed": 3,
    "calibrate": 4, "eval": 4, "bench": 4, "analysis": 4, "train": 4,
    "cli": 5, "demo": 5, "demo_speed": 5, "evaluate": 5,
    "__init__": 3,  # the package root re-exports layers <= 3 (api, methods, patterns, integrations)
}
#: (importing component, imported component): upward imports still present, to be removed
KNOWN_UPWARD: set = set()


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    rel = path.relative_to(ROOT.parent).with_suffix("").parts
    is_pkg = rel[-1] == "__init__"
    pkg = list(rel[:-1]) if is_pkg else list(rel[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "sparsattn" or t.startswith("sparsattn."):
                yield t, node.lineno


def _upward():
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("").parts
        src = _component(".".join(rel))
        for target, line in _imports(path):
            dst = _component(target)
            if dst not in LAYER:  # a name re-exported by the package root (``from sparsattn import attention``)
                dst = "__init__"
            if src == dst or src not in LAYER:
                continue
            if LAYER[dst] > LAYER[src]:
                found.setdefault((src, dst), []).append(f"{path.relative_to(ROOT.parent)}:{line} -> {target}")
    return found


def test_every_top_level_component_has_a_layer():
    comps = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert comps - set(LAYER) == set(), "add the new component to LAYER (and to the docstring / CONTRIBUTING.md)"


def test_imports_flow_down():
    found = _upward()
    new = {k: v for k, v in found.items() if k not in KNOWN_UPWARD}
    assert not new, "upward imports:\n" + "\n".join(x for v in new.values() for x in v)
    gone = KNOWN_UPWARD - set(found)
    assert not gone, f"remove from KNOWN_UPWARD (fixed): {sorted(gone)}"
