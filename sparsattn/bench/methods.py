"""Method benchmark: index building (``select``) and sparse attention, end to end, per method,
against cuDNN dense SDPA timed in the same run (PERF.md targets 3: index building <= 5% of dense
time, end to end >= 12x faster at 128K and ~5% density).

Inputs are random (batch 1, 32 query heads, 8 KV heads, head_dim 128, bf16): random q/k carry no
structure, so the *cost* of each method is measured at a budget configured for about 5% density
(the density actually produced is reported beside every row); quality is measured elsewhere on
the bundled model (``docs/methods.md``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import torch

from .common import environment, print_table, time_ms, write_csv, write_json


def method_configs(T: int, density: float = 0.05) -> dict[str, dict]:
    """Per-method hyper-parameters giving roughly ``density`` of the causal pairs at length ``T``."""
    half = T / 2  # average causal row length
    nk64 = T // 64
    return {
        "a_shape": dict(n_init=128, n_local=max(64, int(density * half))),
        "vertical_slash": dict(v_size=1000, s_size=100 + max(8, int(density * half / 128)), block_size=64),
        "block_sparse": dict(top_k=max(2, int(density * nk64 / 2)), block_size=64),
        "hip": dict(mask_k=max(256, int(density * half) // 64 * 64), block_k=64),  # a multiple of block_k
        "s2_attention": dict(vert_stride=max(2, int(1 / density)), local_blocks=max(1, int(density * nk64 / 4))),
        "longheads": dict(atten_length=max(1024, int(density * half) // 256 * 256)),
        # top-k mode keeps int((1 - sqrt(1 - r)) * nk) of nk blocks per row; about density * nk / 2 of a causal row
        "seer_attention": dict(nz_ratio=1.0 - (1.0 - density / 2) ** 2),
    }


def run_methods_bench(lengths=(32768, 131072), *, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                      density: float = 0.05, methods: Optional[list] = None, out_dir: Path = Path("out"),
                      tiny: bool = False, rep_ms: float = 200.0) -> list[dict]:
    """Time ``select`` + ``attention`` per method and dense SDPA; write ``methods_bench.csv``."""
    from ..api import attention
    from ..methods import SelectContext, get_method

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    if tiny:
        lengths, heads, kv_heads, head_dim, rep_ms = (512,), 2, 1, 32, 5.0
    backend = "triton" if dev == "cuda" else "reference"
    rows = []
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
        for name, cfg in method_configs(T, density).items():
            if methods and name not in methods:
                continue
            row = {"T": T, "method": name, "config": str(cfg), "dense_cudnn_ms" if dev == "cuda" else "dense_ms": dense_ms}
            try:
                m = get_method(name, **cfg)
                if name == "seer_attention":
                    # timing only: a randomly initialised gate costs the same as a trained one
                    from ..methods.seer_attention import SeerGate
                    m.set_gate(SeerGate(heads, kv_heads, head_dim, [0], rope_input="post", seed=0).to(dev))
                ctx = SelectContext(causal=True, extras={"v": v})  # LongHeads' chunk keys need the values
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
        del q, k, v
    write_json({"environment": environment(), "density_target": density}, Path(out_dir) / "methods_bench_env.json")
    print_table(rows, ["T", "method", "density", "select_ms", "attention_ms", "select_over_dense", "speedup_end_to_end",
                       "speedup_attention_only", "error"], title="methods: index building + sparse attention vs dense")
    return rows


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
