"""Prefill benchmark: the block-sparse kernel against SDPA (cuDNN, flash) and compiled FlexAttention.

Everything is timed side by side in one process on identical inputs and identical masks;
results are reported as ratios against baselines timed in the same run. For each sequence
length, head layout and pattern it records forward and forward+backward times, TFLOP/s per
computed block, speed-ups, the relative difference between our output and Flex's on the
same mask, and the peak memory of our forward against the size of q+k+v+out+lse.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import torch

from .. import patterns as P
from .common import environment, peak_memory, print_table, time_ms, write_csv, write_json


def _random_causal_blocks(H: int, nq: int, target: float, device, seed: int) -> torch.Tensor:
    """Random causal block mask at about ``target`` density (relative to causal pairs), with the
    diagonal block and the first (sink) block of every row always kept."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    causal_blocks = nq * (nq + 1) / 2
    forced = 2 * nq - 1
    free = max(causal_blocks - forced, 1)
    p = min(max((target * causal_blocks - forced) / free, 0.0), 1.0)
    m = torch.rand(1, H, nq, nq, generator=g) < p
    eye = torch.eye(nq, dtype=torch.bool)
    m = m | eye | torch.zeros(nq, nq, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)
    return (m & torch.tril(torch.ones(nq, nq, dtype=torch.bool))).to(device)


def _flops_per_block(block_q: int, block_k: int, D: int) -> float:
    return 4.0 * block_q * block_k * D


_WINDOW_MODS: dict = {}


def _flex_window_block_mask(T: int, window: int, block: int, device):
    """FlexAttention's own sliding-window BlockMask (its natural form of the same mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    fn = _WINDOW_MODS.get(window)
    if fn is None:
        def fn(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
        _WINDOW_MODS[window] = fn
    return create_block_mask(fn, None, None, T, T, device=device, BLOCK_SIZE=block)


def _sdpa(q, k, v, backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    gqa = q.shape[1] != k.shape[1]

    def run():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    return run


def _fwd_bwd(fn, inputs, do):
    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out.backward(do)
        return out

    return run


def run_prefill_bench(lengths=(8192, 32768, 131072), *, heads: int = 32, kv_heads_gqa: Optional[int] = 8,
                      gqa_lengths=(32768,), head_dim: int = 128, block: int = 128, window: int = 4096,
                      densities=(0.05, 0.10), backward: bool = True, flex: bool = True, out_dir: Path = Path("out"),
                      seed: int = 0, rep_ms: float = 300.0, tiny: bool = False, progress: bool = True) -> list[dict]:
    """Run the sweep; returns rows and writes ``prefill.csv``, ``prefill_env.json`` and ``prefill.png``.

    ``tiny=True`` runs small sizes on whatever device exists (a smoke test of the harness on CPU).
    """
    from ..api import attention
    from ..kernels.block_sparse.flex import compiled_flex

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    import torch._dynamo as dynamo

    # Flex recompiles per mask_mod and shape; past the limit it silently falls back to an
    # unfused path that materialises the score matrix (out of memory at 32K+). Lift the limit.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, 256)
    if tiny:
        lengths, heads, kv_heads_gqa, gqa_lengths, head_dim, block, window = (256,), 2, 1, (256,), 32, 64, 128
        flex = flex and dev == "cuda"
        rep_ms = 20.0
    out_dir = Path(out_dir)
    rows: list[dict] = []
    configs = [(T, heads, heads) for T in lengths]
    if kv_heads_gqa:
        configs += [(T, heads, kv_heads_gqa) for T in gqa_lengths]
    for T, Hq, Hkv in configs:
        torch.manual_seed(seed)
        q = torch.randn(1, Hq, T, head_dim, device=dev, dtype=dt)
        k = torch.randn(1, Hkv, T, head_dim, device=dev, dtype=dt)
        v = torch.randn(1, Hkv, T, head_dim, device=dev, dtype=dt)
        do = torch.randn_like(q)
        in_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
        io_bytes = in_bytes + q.numel() * q.element_size() + Hq * T * 4  # q+k+v+out+lse
        base = {}
        for name in ("cudnn", "flash"):
            if dev != "cuda":
                break
            try:
                f = _sdpa(q, k, v, name)
                base[f"sdpa_{name}_fwd_ms"] = time_ms(f, rep_ms=rep_ms)
                if backward:
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                    fb = _fwd_bwd(_sdpa(qg, kg, vg, name), (qg, kg, vg), do)
                    base[f"sdpa_{name}_fwdbwd_ms"] = time_ms(fb, rep_ms=rep_ms)
            except Exception as e:  # a backend refusing these shapes is recorded, not fatal
                base[f"sdpa_{name}_error"] = str(e).splitlines()[0][:120]
        nq = T // block
        pats = [("causal", P.causal(T, block_q=block, device=dev), None)]
        pats.append((f"window{window}", P.sliding_window(T, window, block_q=block, device=dev), "window"))
        for d in densities:
            m = _random_causal_blocks(Hq, nq, d, dev, seed + int(d * 1000))
            pats.append((f"random{int(d * 100)}%", P.from_block_mask(m, block_size=block, q_len=T, causal=True), None))
        for pname, pat, flex_kind in pats:
            row = {"T": T, "Hq": Hq, "Hkv": Hkv, "D": head_dim, "dtype": str(dt).replace("torch.", ""),
                   "pattern": pname, "block": block, "density": round(pat.density, 4),
                   "blocks": pat.num_computed_blocks, **base}
            flops_fwd = pat.num_computed_blocks * _flops_per_block(block, block, head_dim) * (Hq // pat.heads)
            f = lambda: attention(q, k, v, pat, backend="triton" if dev == "cuda" else "reference")  # noqa: E731
            row["ours_fwd_ms"] = time_ms(f, rep_ms=rep_ms)
            row["ours_fwd_tflops_per_block"] = flops_fwd / row["ours_fwd_ms"] / 1e9
            mem = peak_memory(f)
            if mem is not None:
                row["ours_fwd_peak_mem_over_io"] = round((in_bytes + mem) / io_bytes, 3)
            ours_out = f()
            if backward:
                qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                fb = _fwd_bwd(lambda: attention(qg, kg, vg, pat, backend="triton" if dev == "cuda" else "reference"),
                              (qg, kg, vg), do)
                row["ours_fwdbwd_ms"] = time_ms(fb, rep_ms=rep_ms)
                row["ours_bwd_ms"] = row["ours_fwdbwd_ms"] - row["ours_fwd_ms"]
                row["ours_bwd_tflops_per_block"] = 2.5 * flops_fwd / max(row["ours_bwd_ms"], 1e-9) / 1e9
            if flex:
                try:
                    bm = _flex_window_block_mask(T, window, block, dev) if flex_kind == "window" else pat.to_flex_block_mask()
                    gqa = Hq != Hkv
                    ff = lambda: compiled_flex()(q, k, v, block_mask=bm, enable_gqa=gqa)  # noqa: E731
                    flex_out = ff()
                    row["flex_vs_ours_rel_diff"] = float((flex_out.float() - ours_out.float()).norm() / flex_out.float().norm())
                    row["flex_fwd_ms"] = time_ms(ff, rep_ms=rep_ms)
                    row["flex_fwd_tflops_per_block"] = flops_fwd / row["flex_fwd_ms"] / 1e9
                    row["fwd_speedup_vs_flex"] = row["flex_fwd_ms"] / row["ours_fwd_ms"]
                    if backward:
                        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                        fb = _fwd_bwd(lambda: compiled_flex()(qg, kg, vg, block_mask=bm, enable_gqa=gqa), (qg, kg, vg), do)
                        row["flex_fwdbwd_ms"] = time_ms(fb, rep_ms=rep_ms)
                        row["flex_bwd_ms"] = row["flex_fwdbwd_ms"] - row["flex_fwd_ms"]
                        row["bwd_speedup_vs_flex"] = row["flex_bwd_ms"] / max(row["ours_bwd_ms"], 1e-9)
                except Exception as e:
                    row["flex_error"] = str(e).splitlines()[0][:160]
            for name in ("cudnn", "flash"):
                if f"sdpa_{name}_fwd_ms" in row:
                    row[f"fwd_speedup_vs_{name}_dense"] = row[f"sdpa_{name}_fwd_ms"] / row["ours_fwd_ms"]
                    if backward and f"sdpa_{name}_fwdbwd_ms" in row:
                        row[f"fwdbwd_speedup_vs_{name}_dense"] = row[f"sdpa_{name}_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
            rows.append(row)
            write_csv(rows, out_dir / "prefill.csv")  # progressive: a timeout keeps what was measured
            if progress:
                print(f"[prefill] T={T} Hq={Hq} Hkv={Hkv} {pname}: density {row['density']:.3f}, ours fwd "
                      f"{row['ours_fwd_ms']:.3f} ms" + (f", flex {row['flex_fwd_ms']:.3f} ms" if 'flex_fwd_ms' in row else "")
                      + (f", cudnn dense {row['sdpa_cudnn_fwd_ms']:.3f} ms" if 'sdpa_cudnn_fwd_ms' in row else ""),
                      flush=True)
        del q, k, v, do
        if dev == "cuda":
            torch.cuda.empty_cache()
    write_csv(rows, out_dir / "prefill.csv")
    write_json({"environment": environment(), "args": dict(lengths=list(lengths), heads=heads, kv_heads_gqa=kv_heads_gqa,
                                                           head_dim=head_dim, block=block, window=window,
                                                           densities=list(densities))},
               out_dir / "prefill_env.json")
    plot_prefill(rows, out_dir / "prefill.png")
    print_table(rows, ["T", "Hq", "Hkv", "pattern", "density", "ours_fwd_ms", "flex_fwd_ms", "fwd_speedup_vs_flex",
                       "bwd_speedup_vs_flex", "ours_fwd_tflops_per_block", "fwd_speedup_vs_cudnn_dense",
                       "fwdbwd_speedup_vs_cudnn_dense", "ours_fwd_peak_mem_over_io", "flex_vs_ours_rel_diff"],
                title="prefill (ratios are same-run)")
    return rows


def plot_prefill(rows: list[dict], path: Path) -> Optional[Path]:
    """Bar chart: forward speed-up vs Flex and vs cuDNN dense per (T, pattern)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['T'] // 1024}K {r['pattern']}" + (" gqa" if r["Hq"] != r["Hkv"] else "") for r in rows]
    series = [("fwd_speedup_vs_flex", "fwd vs Flex (same mask)"), ("bwd_speedup_vs_flex", "bwd vs Flex"),
              ("fwd_speedup_vs_cudnn_dense", "fwd vs cuDNN dense")]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows)), 4.5))
    w = 0.8 / len(series)
    any_data = False
    for i, (key, name) in enumerate(series):
        vals = [r.get(key) or 0.0 for r in rows]
        any_data |= any(vals)
        ax.bar([x + i * w for x in range(len(rows))], vals, width=w, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks([x + w for x in range(len(rows))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("speed-up (x, log)")
    ax.legend(fontsize=8)
    ax.set_title("sparsattn block-sparse prefill")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path) if any_data else None


def tune(T: int = 32768, heads: int = 32, head_dim: int = 128, block: int = 128, density: float = 0.1,
         fwd_configs=((64, 4, 3), (64, 8, 3), (128, 8, 2), (128, 8, 3), (64, 8, 4)),
         bwd_configs=((64, 64, 8, 2), (64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)),
         rep_ms: float = 200.0) -> dict:
    """Time kernel launch configurations on one problem (the semantics never depend on them)."""
    from ..api import attention

    dev = "cuda"
    q = torch.randn(1, heads, T, head_dim, device=dev, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    do = torch.randn_like(q)
    res = {}
    for pname, pat in (("causal", P.causal(T, block_q=block, device=dev)),
                       ("random", P.from_block_mask(_random_causal_blocks(heads, T // block, density, dev, 1),
                                                    block_size=block, q_len=T, causal=True))):
        for cfg in fwd_configs:
            os.environ["SPARSATTN_FWD_CONFIG"] = ",".join(map(str, cfg))
            try:
                res[f"fwd {pname} {cfg}"] = time_ms(lambda: attention(q, k, v, pat, backend="triton"), rep_ms=rep_ms)
            except Exception as e:
                res[f"fwd {pname} {cfg}"] = f"error: {str(e).splitlines()[0][:80]}"
        os.environ.pop("SPARSATTN_FWD_CONFIG", None)
        for cfg in bwd_configs:
            os.environ["SPARSATTN_BWD_CONFIG"] = ",".join(map(str, cfg))
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            try:
                res[f"fwdbwd {pname} {cfg}"] = time_ms(_fwd_bwd(lambda: attention(qg, kg, vg, pat, backend="triton"),
                                                                 (qg, kg, vg), do), rep_ms=rep_ms)
            except Exception as e:
                res[f"fwdbwd {pname} {cfg}"] = f"error: {str(e).splitlines()[0][:80]}"
        os.environ.pop("SPARSATTN_BWD_CONFIG", None)
    for k_, v_ in res.items():
        print(f"[tune] {k_}: {v_ if isinstance(v_, str) else f'{v_:.3f} ms'}", flush=True)
    return res


def build_parser(p: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="sparsattn bench prefill", description=__doc__)
    p.add_argument("--lengths", default="8192,32768,131072", help="comma-separated sequence lengths")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--gqa-kv-heads", type=int, default=8, help="KV heads of the GQA case (0: skip)")
    p.add_argument("--gqa-lengths", default="32768")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--densities", default="0.05,0.10")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--tune", action="store_true", help="time launch configurations first (GPU)")
    p.add_argument("--tiny", action="store_true", help="small smoke run (works on CPU)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder (CSV, JSON, PNG)")
    return p


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("sparsattn bench prefill: needs a CUDA GPU (use --tiny for a CPU smoke run)")
    if args.tune and torch.cuda.is_available():
        write_json(tune(), Path(args.out) / "prefill_tune.json")
    run_prefill_bench(tuple(int(x) for x in args.lengths.split(",")), heads=args.heads,
                      kv_heads_gqa=args.gqa_kv_heads or None, gqa_lengths=tuple(int(x) for x in args.gqa_lengths.split(",")),
                      head_dim=args.head_dim, block=args.block, window=args.window,
                      densities=tuple(float(x) for x in args.densities.split(",")), backward=not args.no_backward,
                      flex=not args.no_flex, out_dir=Path(args.out), tiny=args.tiny)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
