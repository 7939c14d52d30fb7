"""Method benchmark: index building (``select``) and sparse attention, end to end, per method,
against cuDNN dense SDPA timed in the same run (PERF.md targets 3: index building <= 5% of dense
time, end to end >= 12x faster at 128K and ~5% density).

Inputs are random (batch 1, 32 query heads, 8 KV heads, head_dim 128, bf16): random q/k carry no
structure, so the *cost* of each method is measured at a budget configured for about 5% density
(the density actually produced is reported beside every row); quality is measured elsewhere on
the bundled model (``docs/methods.md``).

The methods are the registry's prefill methods that can be aimed at a density
(``Method.density_knob``, taken at the knob's first guess); a calibrated method is timed on a random
calibration of the benchmark's shape (``Calibrated.random_calibration``: the cost does not depend on
the fitted values) or left out when it provides none. A method registered with these presets
appears here without editing this file.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .common import environment, print_table, time_ms, write_csv, write_json


def random_calibrations(out_dir, *, q_heads: int, kv_heads: int, head_dim: int, layers: int = 1,
                        seed: int = 0) -> dict:
    """random_calibrations: {method: path} of a random calibration of this attention shape, written
    under ``out_dir``, for every registered calibrated method that provides one."""
    from ..methods import list_methods, method_class
    from ..methods.base import Calibrated

    out = {}
    for name in list_methods():
        cls = method_class(name)
        if issubclass(cls, Calibrated):
            path = cls.random_calibration(Path(out_dir) / name, q_heads=q_heads, kv_heads=kv_heads,
                                          head_dim=head_dim, layers=layers, seed=seed)
            if path is not None:
                out[name] = str(path)
    return out


def method_configs(T: int, density: float = 0.05, ctx=None, *, skipped: Optional[dict] = None) -> dict[str, dict]:
    """Per-method hyper-parameters giving roughly ``density`` of the causal pairs at length ``T``: every
    registered prefill method's ``density_knob(T, density, ctx)`` at its first guess. ``ctx``: a
    ``PresetContext`` (default: block 64, no calibrations). Methods without a knob, or whose knob
    needs a calibration ``ctx`` lacks, are left out (with the reason in ``skipped`` when given)."""
    from ..methods import list_methods, method_class
    from ..methods.base import PresetContext

    ctx = ctx if ctx is not None else PresetContext(block_size=64)
    out = {}
    for name in list_methods("prefill"):
        try:
            knob = method_class(name).density_knob(T, density, ctx)
        except ValueError as e:  # e.g. a calibration not given in ctx
            if skipped is not None:
                skipped[name] = str(e)
            continue
        if knob is None:
            if skipped is not None:
                skipped[name] = "no density knob"
            continue
        out[name] = knob.config(knob.guess)
    return out


def run_methods_bench(lengths=(32768, 131072), *, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                      density: float = 0.05, methods: Optional[list] = None, out_dir: Path = Path("out"),
                      tiny: bool = False, rep_ms: float = 200.0) -> list[dict]:
    """Time ``select`` + ``attention`` per method and dense SDPA; write ``methods_bench.csv``."""
    from ..api import attention
    from ..methods import SelectContext, get_method
    from ..methods.base import PresetContext

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    if tiny:
        lengths, heads, kv_heads, head_dim, rep_ms = (512,), 2, 1, 32, 5.0
    backend = "triton" if dev == "cuda" else "reference"
    rows = []
    cal_dir = tempfile.TemporaryDirectory(prefix="sparsattn_methods_bench_")
    n_layers = 8  # the inputs stand for the last layer of an 8-layer model (a sparse layer of layered methods)
    cals = random_calibrations(cal_dir.name, q_heads=heads, kv_heads=kv_heads, head_dim=head_dim, layers=n_layers)
    ctx_preset = PresetContext(n_layers=n_layers, n_heads=heads, group_size=heads // kv_heads, block_size=64,
                               calibrations=cals)
    for T in lengths:
        torch.manual_seed(0)
        q = torch.randn(1, heads, T, head_dim, device=dev, dtype=dt)
        k = torch.randn(1, kv_heads, T, head_dim, device=dev, dtype=dt)
        v = torch.randn(1, kv_heads, T, head_dim, device=dev, dtype=dt)
        if dev == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def dense():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            def dense():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        dense_ms = time_ms(dense, rep_ms=rep_ms)
        skipped: dict = {}
        for name, cfg in method_configs(T, density, ctx_preset, skipped=skipped).items():
            if methods and name not in methods:
                continue
            shown = {k_: (os.path.basename(v_) if k_.endswith("path") and isinstance(v_, str) else v_) for k_, v_ in cfg.items()}
            row = {"T": T, "method": name, "config": str(shown), "dense_cudnn_ms" if dev == "cuda" else "dense_ms": dense_ms}
            try:
                m = _on_device(get_method(name, **cfg), dev)
                ctx = SelectContext(layer=n_layers - 1, causal=True, v=v)  # LongHeads' chunk keys need the values
                pat = m.select(q, k, ctx)
                row["density"] = round(pat.density, 4)
                row["select_ms"] = time_ms(lambda: m.select(q, k, ctx), rep_ms=rep_ms)
                row["attention_ms"] = time_ms(lambda: attention(q, k, v, pat, backend=backend), rep_ms=rep_ms)
                row["total_ms"] = row["select_ms"] + row["attention_ms"]
                row["select_over_dense"] = row["select_ms"] / dense_ms
                row["speedup_end_to_end"] = dense_ms / row["total_ms"]
                row["speedup_attention_only"] = dense_ms / row["attention_ms"]
            except Exception as e:  # recorded, never hidden
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            write_csv(rows, Path(out_dir) / "methods_bench.csv")
            print(f"[methods] T={T} {name}: " + ", ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}"
                                                        for k_, v_ in row.items() if k_ not in ("T", "method", "config")),
                  flush=True)
        for name, why in skipped.items():
            if not methods or name in methods:
                print(f"[methods] T={T} {name}: not timed ({why})", flush=True)
        del q, k, v
    cal_dir.cleanup()
    write_json({"environment": environment(), "density_target": density}, Path(out_dir) / "methods_bench_env.json")
    print_table(rows, ["T", "method", "density", "select_ms", "attention_ms", "select_over_dense", "speedup_end_to_end",
                       "speedup_attention_only", "error"], title="methods: index building + sparse attention vs dense")
    return rows


def _on_device(m, dev):
    """Move a method's torch modules (e.g. a loaded gate) to ``dev``; methods without any are unchanged."""
    for v in vars(m).values():
        if isinstance(v, torch.nn.Module):
            v.to(dev)
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsattn.bench.methods", description=__doc__)
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--methods", default=None, help="comma-separated subset")
    p.add_argument("--tiny", action="store_true", help="small CPU smoke run")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = p.parse_args(argv)
    run_methods_bench(tuple(int(x) for x in a.lengths.split(",")), density=a.density,
                      methods=a.methods.split(",") if a.methods else None, out_dir=Path(a.out), tiny=a.tiny)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
