"""_files: result files written atomically (CSV and JSON), the one home of both writers.

Low in the import graph (standard library only) so that benchmarks, evaluation drivers, analyses and
the distributed benchmark write their results the same way.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional

__all__ = ["write_csv", "write_json"]


def write_csv(rows: list[dict], path: Path, cols: Optional[list[str]] = None) -> Path:
    """Write rows to ``path``: columns ``cols`` (others ignored) or the union of the rows' keys in
    first-seen order; None and missing values as empty cells. Written to a temporary file and moved
    into place, so a reader (or a run killed mid-write) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = list(cols) if cols is not None else []
    if cols is None:
        for r in rows:
            for k in r:
                if k not in keys:
                    keys.append(k)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    os.replace(tmp, path)
    return path


def write_json(obj, path: Path) -> Path:
    """Write ``obj`` as indented JSON to ``path`` (parents created; non-JSON values through ``str``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path
