"""_harness: what the evaluation drivers share besides the recorder (``eval.recorder``) and the model
loader (``sparsattn.models.load``): a timed log, command-line parsing (comma lists, ``--method-config``),
the matplotlib setup and figure saving, and the environment record
(``sparsattn._environment.environment``, the one format of the library)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from .._environment import environment  # noqa: F401  (the drivers' environment record)

__all__ = ["environment", "timed_logger", "csv_list", "csv_ints", "csv_floats", "parse_method_config", "pyplot",
           "save_figure"]


def timed_logger(tag: str, t0: Optional[float] = None) -> Callable[[str], None]:
    """timed_logger: a ``log(msg)`` printing ``[tag   12.3s] msg`` (seconds since ``t0``, default now), flushed."""
    start = time.time() if t0 is None else t0

    def log(msg: str) -> None:
        print(f"[{tag} {time.time() - start:6.1f}s] {msg}", flush=True)
    return log


def csv_list(s) -> list[str]:
    """csv_list: the non-empty, stripped items of a comma-separated string."""
    return [x.strip() for x in str(s).split(",") if x.strip()]


def csv_ints(s, name: str = "value") -> list[int]:
    """csv_ints: comma-separated integers (ValueError naming ``name`` otherwise)."""
    try:
        return [int(x) for x in csv_list(s)]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {s!r}") from None


def csv_floats(s, name: str = "value") -> list[float]:
    """csv_floats: comma-separated numbers (ValueError naming ``name`` otherwise)."""
    try:
        return [float(x) for x in csv_list(s)]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {s!r}") from None


def parse_method_config(src: Optional[str]) -> Optional[dict]:
    """parse_method_config: the ``--method-config`` option: inline JSON or a JSON file path ->
    ``{method: {hyper-parameter: value}}`` (None when not given).

    Raises:
        ValueError: not valid JSON (the file named), or not a JSON object."""
    import json

    if not src:
        return None
    if not src.lstrip().startswith(("{", "[")):  # a path: read through the checked reader (file named)
        from ..calibration import read_json

        cfg = read_json(src, arg="--method-config", kind="JSON file").value
    else:
        try:
            cfg = json.loads(src)
        except json.JSONDecodeError as e:
            raise ValueError(f"--method-config: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError("--method-config: expected a JSON object {method: {...}}")
    return cfg


def add_needle_arguments(p, *, what: str, reads: str, keeps: str) -> None:
    """The needle-coverage options of a quality driver (``sparsattn.eval.needle``): ``--needle on|off``,
    ``--needle-threshold`` (0.1) and ``--needle-keep`` (0.5); ``what`` / ``reads`` / ``keeps`` word the help
    for the driver (what is measured, which rows read, what keeps)."""
    p.add_argument("--needle", choices=("on", "off"), default="on", help=f"needle coverage of {what} (on: default)")
    p.add_argument("--needle-threshold", type=float, default=0.1,
                   help=f"a head reads the needle when {reads} put >= this share of dense attention on it")
    p.add_argument("--needle-keep", type=float, default=0.5,
                   help=f"a reading head keeps the needle when {keeps} keeps >= this share of that attention")


def pyplot():
    """pyplot: ``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 110) -> Path:
    """save_figure: write ``fig`` to ``path`` (folders created), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
