"""Benchmark harness pieces shared by every benchmark: timing, environment record, CSV, table."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from .._files import write_csv, write_json  # noqa: F401  (their one home; re-exported)


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
