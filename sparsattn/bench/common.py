"""Benchmark harness pieces shared by every benchmark: timing, environment record, CSV, table."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch


def environment() -> dict:
    """GPU, versions and date: stored beside every result file (``sparsattn._environment.environment``,
    the one record format of the library; ``device`` is the GPU's name, or ``"cpu"``)."""
    from .._environment import environment as _env

    return _env()


def time_ms(fn: Callable[[], object], *, warmup_ms: float = 50, rep_ms: float = 300) -> float:
    """Median milliseconds of ``fn`` (CUDA events through ``triton.testing.do_bench``; wall clock on CPU)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    import time

    fn()
    ts = []
    end = time.perf_counter() + rep_ms / 1e3
    while time.perf_counter() < end or len(ts) < 3:
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def peak_memory(fn: Callable[[], object]) -> Optional[int]:
    """Peak bytes allocated during one call of ``fn`` above what was allocated before (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path


def print_table(rows: Iterable[dict], cols: list[str], title: str = "") -> None:
    """Print a compact table with rich (falls back to plain text)."""
    rows = list(rows)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title or None)
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[_fmt(r.get(c)) for c in cols])
        Console(width=200).print(t)
    except Exception:  # pragma: no cover
        print(title)
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(_fmt(r.get(c)) for c in cols))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
