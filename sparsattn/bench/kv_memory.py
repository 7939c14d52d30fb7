"""KV-policy memory benchmark: bytes each ``sparsattn.kv`` policy keeps of one layer's K/V cache.

Memory is counted, not timed, so the numbers do not depend on the device: a ``KVCache`` of one
layer (GQA ``kv_heads``, ``head_dim``, bf16) is filled with ``T`` tokens of random keys/values per
sequence, each policy is applied once (``KVPolicy.apply``), and its own report (bytes and slots
before/after) is recorded together with ``KVCache.nbytes`` (storage actually held, metadata and
quantised codes included) and the bytes of the slots in use (``KVCache.used_bytes``). When heads keep
different numbers of tokens (Razor's retrieval heads, MoA's spans), ``KVCache.shrink`` stores the
layer as groups of heads of similar length, so the storage held follows the slots in use up to the
per-slot metadata and the padding inside a group (``group_waste``).

Every policy of the registry (``sparsattn.kv.policies.list_policies``) is measured with its own
example settings (``KVPolicy.example(T, kv_heads)``, written in the ``config`` column) and the signals
its ``apply`` takes (``KVPolicy.example_signals``): a policy registered with presets appears here
without editing this file.

Usage: ``python -m sparsattn.bench.kv_memory --out DIR [--lengths 32768,131072] [--batch 1]``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .common import environment, print_table, write_csv, write_json


def _policies(T: int, kv_heads: int) -> dict:
    """{name: (policy, description)}: every registered KV policy's example for this cache shape."""
    from ..kv.policies import list_policies, policy_class

    return {name: policy_class(name).example(T, kv_heads) for name in list_policies()}


def run_kv_memory(lengths=(32768, 131072), *, batch: int = 1, kv_heads: int = 8, q_heads: int = 32,
                  head_dim: int = 128, dtype=torch.bfloat16, device: str = "cpu", out_dir=None,
                  seed: int = 0) -> list[dict]:
    """Apply every KV policy to a filled one-layer cache per length; returns (and writes) the rows."""
    from ..kv import KVCache

    rows = []
    for T in lengths:
        for name, (policy, cfg) in _policies(T, kv_heads).items():
            g = torch.Generator(device="cpu").manual_seed(seed)
            k = torch.randn(batch, kv_heads, T, head_dim, generator=g).to(device=device, dtype=dtype)
            v = torch.randn(batch, kv_heads, T, head_dim, generator=g).to(device=device, dtype=dtype)
            cache = KVCache(1, batch, kv_heads, head_dim, dtype=dtype, device=device)
            cache.append(0, k, v)
            full_bytes = cache.nbytes(0)
            signals = type(policy).example_signals(k, q_heads, g)
            rep = policy.apply(cache, 0, **signals)
            row = {"T": T, "batch": batch, "policy": name, "config": cfg,
                   "bytes_full": full_bytes, "bytes_kept": cache.nbytes(0),
                   "kept_fraction": round(cache.nbytes(0) / full_bytes, 4),
                   "used_fraction": round(rep["bytes_after"] / rep["bytes_before"], 4),
                   "kv_bytes_before": rep.get("bytes_before"), "kv_bytes_after": rep.get("bytes_after"),
                   "slots_before": rep.get("slots_before"), "slots_after": rep.get("slots_after")}
            rows.append(row)
            print(f"[kv_memory] T={T} {name}: storage held {row['kept_fraction']:.4f} of {full_bytes / 2**20:.1f} MiB, "
                  f"slots in use {row['used_fraction']:.4f} ({cfg})", flush=True)
            del cache, k, v
    if out_dir is not None:
        out = Path(out_dir)
        write_csv(rows, out / "kv_memory.csv")
        write_json({"environment": environment(), "dtype": str(dtype), "kv_heads": kv_heads,
                    "head_dim": head_dim}, out / "kv_memory_env.json")
        plot_kv_memory(out / "kv_memory.csv", out / "kv_memory.png")
    print_table(rows, ["T", "policy", "bytes_full", "bytes_kept", "kept_fraction", "used_fraction", "config"],
                title="KV policies: bytes kept of one layer's cache")
    return rows


def plot_kv_memory(csv_path, png_path) -> str:
    """plot_kv_memory: bars of the fraction of a layer's full cache each KV policy holds (storage, solid)
    and uses (slots in use, hatched), per context length, from a ``kv_memory.csv``. Returns the PNG path."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"csv_path: no rows in {csv_path}")
    lengths = sorted({int(r["T"]) for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(policies), 4.2))
    w = 0.8 / (2 * len(lengths))
    for j, T in enumerate(lengths):
        for i, pol in enumerate(policies):
            r = next((r for r in rows if r["policy"] == pol and int(r["T"]) == T), None)
            if r is None:
                continue
            x = i + (2 * j - len(lengths) + 0.5) * w
            ax.bar(x, float(r["kept_fraction"]), width=w, color=f"C{j}", label=f"{T // 1024}K: storage held" if i == 0 else None)
            ax.bar(x + w, float(r["used_fraction"]), width=w, color=f"C{j}", alpha=0.45, hatch="//",
                   label=f"{T // 1024}K: slots in use" if i == 0 else None)
            ax.text(x, float(r["kept_fraction"]) + 0.01, f"{float(r['kept_fraction']):.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(policies)))
    ax.set_xticklabels(policies)
    ax.set_ylabel("fraction of the full layer cache")
    ax.set_ylim(0, 1.05)
    ax.set_title("KV policies: memory of one layer (KVCache.nbytes / the uncompressed cache)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return str(png_path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsattn.bench.kv_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--plot", default=None, metavar="CSV", help="only draw the figure of an existing kv_memory.csv")
    a = p.parse_args(argv)
    if a.plot:
        print(plot_kv_memory(a.plot, Path(a.plot).with_suffix(".png")))
        return 0
    lengths = tuple(int(x) for x in a.lengths.split(","))
    if any(t < 1 for t in lengths) or a.batch < 1:
        raise SystemExit("--lengths and --batch: expected positive integers")
    run_kv_memory(lengths, batch=a.batch, device=a.device, out_dir=a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
