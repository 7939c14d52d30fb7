"""Training speed of every registered layer against dense cuDNN attention (issue 18).

For each layer of ``sparsattn.nn`` and each length ``T``: the median time of one forward + backward
of the layer alone (``x [batch, T, dim]`` in, a scalar loss out; 2-D layers see the same tokens as a
square ``[batch, sqrt(T), sqrt(T), dim]`` image), its tokens per second and the peak memory it
allocates, against the same projections around dense causal ``scaled_dot_product_attention`` on
cuDNN (the fastest dense attention on the H200) timed in the same process. ``speedup`` is
``dense_ms / layer_ms``; the crossover of a layer is the first measured length from which it is
faster than dense at every longer length measured.

Layers use their paper defaults (``causal=True`` where a 1-D layer supports it; 2-D layers run their
image, non-causal form); a length where the dense
baseline runs out of memory keeps the layer's row with an empty baseline. A layer whose time at one
length passes ``max_ms`` is not run at longer lengths (recorded as skipped), so a sweep of many
layers fits one device call.

Run: ``python -m sparsattn.bench.layers --lengths 4096 16384 65536 --out layers_speed.csv``.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import get_layer, hyper_parameters, layer_class, list_layers
from .common import environment, write_csv

#: the name the baseline is measured under (not a registered layer)
DENSE_BASELINE = "dense-sdpa"

COLUMNS = ["layer", "kind", "T", "batch", "dim", "heads", "dtype", "layer_ms", "dense_ms", "speedup",
           "tokens_per_s", "dense_tokens_per_s", "peak_mib", "dense_peak_mib", "density", "status", "device",
           "torch", "date"]


class DenseSDPA(nn.Module):
    """DenseSDPA: the baseline: q/k/v/out projections around dense causal SDPA (cuDNN on CUDA)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if x.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, T, D))


def build(name: str, dim: int, heads: int, T: int) -> nn.Module:
    """build: layer ``name`` with its paper defaults for length ``T`` (causal where supported; the
    task length as ``l_max`` and half of it as ``prefix_len`` for layers that take them)."""
    if name == DENSE_BASELINE:
        return DenseSDPA(dim, heads)
    hp = hyper_parameters(name)
    cls = layer_class(name)
    cfg = {}
    if "causal" in hp:  # causal where supported; 2-D layers (images) run their non-causal form
        cfg["causal"] = cls.layout == "1d" and True in tuple(getattr(cls, "causal_modes", (True,)))
    if "l_max" in hp:
        cfg["l_max"] = T
    if "max_len" in hp and hp["max_len"] is not None and hp["max_len"] < T:
        cfg["max_len"] = T
    if "prefix_len" in hp:
        cfg["prefix_len"] = T // 2
    for k in ("layer_index", "n_layers"):
        if k in hp:
            cfg[k] = 0 if k == "layer_index" else 2
    return get_layer(name, dim, heads, **cfg)


def _inputs(layer: nn.Module, batch: int, T: int, dim: int, device, dtype) -> torch.Tensor:
    if getattr(layer, "layout", "1d") == "2d":
        side = int(round(math.sqrt(T)))
        if side * side != T:
            raise ValueError(f"T: a 2-D layer needs a square number of tokens, got {T}")
        return torch.randn(batch, side, side, dim, device=device, dtype=dtype, requires_grad=True)
    return torch.randn(batch, T, dim, device=device, dtype=dtype, requires_grad=True)


def measure(name: str, T: int, *, batch: int = 1, dim: int = 1024, heads: int = 16, device: str = "cuda",
            dtype=torch.bfloat16, rep_ms: float = 200.0) -> dict:
    """measure: ``{"ms", "peak_mib", "density"}`` of one forward + backward of layer ``name`` at
    length ``T`` (parameters in ``dtype``; the first call, compilation included, is not timed)."""
    from .common import time_ms

    torch.manual_seed(0)
    layer = build(name, dim, heads, T).to(device=device, dtype=dtype).train()
    x = _inputs(layer, batch, T, dim, device, dtype)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        y.float().square().mean().backward()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = float("nan")
    ms = time_ms(step, warmup_ms=25, rep_ms=rep_ms)
    density = None
    if hasattr(layer, "cost") and name != DENSE_BASELINE:
        try:
            density = float(layer.cost(T)["density"])
        except Exception:  # cost is informative only
            density = None
    del layer, x
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"ms": ms, "peak_mib": peak, "density": density}


def run(layers: Optional[Sequence[str]], lengths: Sequence[int], *, out: Path, batch: int = 1, dim: int = 1024,
        heads: int = 16, device: str = "cuda", max_ms: float = 2000.0, long_lengths: Sequence[int] = (),
        long_kinds: Sequence[str] = ("mixer",)) -> list[dict]:
    """run: the sweep (module docstring); ``long_lengths`` are measured only for layers whose
    ``kind`` is in ``long_kinds`` (the linear mixers at 256K / 1M). Writes ``out`` after every row."""
    names = list(layers) if layers else [n for n in list_layers() if layer_class(n).kind != "helper"]
    env = environment()
    rows: list[dict] = []
    dense: dict[int, dict] = {}
    all_lengths = sorted(set(lengths) | set(long_lengths))
    for T in all_lengths:
        try:
            dense[T] = measure(DENSE_BASELINE, T, batch=batch, dim=dim, heads=heads, device=device)
        except torch.OutOfMemoryError:
            dense[T] = None
            torch.cuda.empty_cache()
        d = dense[T]
        print(f"[layers] dense sdpa T={T}: " + (f"{d['ms']:.2f} ms" if d else "OOM"), flush=True)
    for name in names:
        cls = layer_class(name)
        Ts = [T for T in all_lengths if T in lengths or cls.kind in long_kinds]
        slow = False
        for T in Ts:
            row = {"layer": name, "kind": cls.kind, "T": T, "batch": batch, "dim": dim, "heads": heads,
                   "dtype": "bf16", "device": env.get("device"), "torch": env.get("torch"), "date": env.get("date")}
            d = dense.get(T)
            if d:
                row.update(dense_ms=round(d["ms"], 4), dense_peak_mib=round(d["peak_mib"], 1),
                           dense_tokens_per_s=round(batch * T / d["ms"] * 1e3))
            if slow:
                row["status"] = f"skipped (slower than {max_ms} ms at a shorter length)"
            else:
                try:
                    m = measure(name, T, batch=batch, dim=dim, heads=heads, device=device)
                    row.update(layer_ms=round(m["ms"], 4), peak_mib=round(m["peak_mib"], 1),
                               tokens_per_s=round(batch * T / m["ms"] * 1e3), density=m["density"], status="ok")
                    if d:
                        row["speedup"] = round(d["ms"] / m["ms"], 4)
                    slow = m["ms"] > max_ms
                except torch.OutOfMemoryError:
                    row["status"] = "OOM"
                    torch.cuda.empty_cache()
                    slow = True
                except Exception as e:  # recorded: one layer's failure does not stop the sweep
                    row["status"] = f"error: {type(e).__name__}: {e}"[:200]
                    slow = True
            rows.append(row)
            write_csv(rows, out, COLUMNS)
            print(f"[layers] {name:>13s} T={T:>7d}: {row.get('layer_ms', '-')} ms, speedup "
                  f"{row.get('speedup', '-')}, peak {row.get('peak_mib', '-')} MiB  {row.get('status')}", flush=True)
    return rows


def crossovers(rows: Sequence[dict]) -> dict[str, Optional[int]]:
    """crossovers: per layer, the first length from which it is faster than dense at every longer
    measured length (None when it never is)."""
    by: dict[str, list] = {}
    for r in rows:
        if r.get("speedup") not in (None, ""):
            by.setdefault(r["layer"], []).append((int(r["T"]), float(r["speedup"])))
    out = {}
    for name, pts in by.items():
        pts.sort()
        cross = None
        for i, (T, _) in enumerate(pts):
            if all(s > 1.0 for _, s in pts[i:]):
                cross = T
                break
        out[name] = cross
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m sparsattn.bench.layers [--layers ...] --lengths ... --out CSV``."""
    p = argparse.ArgumentParser(prog="python -m sparsattn.bench.layers", description=__doc__.splitlines()[0])
    p.add_argument("--layers", nargs="*", help="registered layers (default: all but model-building helpers)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--long-lengths", type=int, nargs="*", default=[], help="extra lengths for the linear mixers")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-ms", type=float, default=2000.0)
    p.add_argument("--out", default="layers_speed.csv")
    a = p.parse_args(argv)
    for name, v in (("--lengths", a.lengths), ("--long-lengths", a.long_lengths)):
        if any(t <= 0 for t in v):
            p.error(f"argument {name}: expected positive lengths, got {v}")
    rows = run(a.layers, a.lengths, out=Path(a.out), batch=a.batch, dim=a.dim, heads=a.heads, device=a.device,
               max_ms=a.max_ms, long_lengths=a.long_lengths)
    print("[layers] crossover (first length from which faster than dense):")
    for name, T in sorted(crossovers(rows).items()):
        print(f"[layers]   {name:>13s}: {T if T is not None else 'never (in the measured range)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
