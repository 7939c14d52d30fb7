"""patterns: CAB's four attention patterns through the kernels (CAB: Comprehensive Attention
Benchmarking on Long Sequence Modeling, Zhang et al., arXiv 2210.07661).

CAB sorts attention by its pattern: causal / non-causal x self / cross. Each is run here through
``sparsattn.attention`` (the block-sparse kernel: Triton on a GPU, the Triton interpreter on a CPU
when ``TRITON_INTERPRET=1``, otherwise the torch reference) with three masks (the full pattern, a
sliding window, random blocks) and compared with a float64 dense softmax on the same mask
(``kernels.block_sparse.reference.dense_reference``): relative error, max abs error, and on a GPU the
kernel's time against torch SDPA on the dense shape. Cross attention has ``Tq != Tk``; causal cross
aligns bottom-right (query i of Tq sees keys ``j <= i + Tk - Tq``), as everywhere in the library.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import Report, progress

SETTINGS = (("causal self", True, False), ("non-causal self", False, False),
            ("causal cross", True, True), ("non-causal cross", False, True))


def _masks(Tq: int, Tk: int, is_causal: bool, bs: int, device, seed: int) -> dict:
    from .. import patterns as P

    full = (P.causal if is_causal else P.dense)(Tq, Tk, block_q=bs, device=device)
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-Tq // bs), -(-Tk // bs)
    rand = torch.rand(1, 1, nq, nk, generator=g) < 0.4
    rand[..., torch.arange(nq), (torch.arange(nq) * nk // nq).clamp(max=nk - 1)] = True
    if is_causal:  # keep each row's diagonal block so that no query is left without a key
        rand[..., torch.arange(nq), ((torch.arange(nq) + 1) * bs - 1 + Tk - Tq).clamp(0, Tk - 1) // bs] = True
    return {"full": full,
            "sliding window 48": P.sliding_window(Tq, 48, Tk, causal=is_causal, block_q=bs, device=device),
            "random blocks 40%": P.from_block_mask(rand.to(device), block_size=bs, q_len=Tq, kv_len=Tk, causal=is_causal)}


def run_patterns(*, Tq_self: int = 200, Tq_cross: int = 136, Tk_cross: int = 264, heads: int = 4, kv_heads: int = 2,
                 head_dim: int = 40, block: int = 32, dtype=torch.float32, device: Optional[str] = None, seed: int = 0,
                 backend: Optional[str] = None, show_progress: bool = True) -> list:
    """run_patterns: one row per (CAB pattern, mask): backend, density, relative and max error against
    float64 dense attention on the same mask, and (GPU) kernel ms vs SDPA ms on the dense shape."""
    from .. import attention
    from ..bench.common import time_ms
    from ..kernels.block_sparse.reference import dense_reference

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    jobs = [(name, c, x, m) for name, c, x in SETTINGS for m in ("full", "sliding window 48", "random blocks 40%")]
    g = torch.Generator().manual_seed(seed)
    for name, is_causal, cross, mname in progress(jobs, "patterns", show_progress):
        Tq, Tk = (Tq_cross, Tk_cross) if cross else (Tq_self, Tq_self)
        q = torch.randn(1, heads, Tq, head_dim, generator=g).to(dev, dtype)
        k = torch.randn(1, kv_heads, Tk, head_dim, generator=g).to(dev, dtype)
        v = torch.randn(1, kv_heads, Tk, head_dim, generator=g).to(dev, dtype)
        p = _masks(Tq, Tk, is_causal, block, dev, seed)[mname]
        out = attention(q, k, v, p, backend=backend)
        mask = p.to_dense_mask()
        ref, _ = dense_reference(q, k, v, mask=mask)
        err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))
        row = {"pattern": name, "mask": mname, "Tq": Tq, "Tk": Tk, "density": round(float(p.density), 4),
               "rel_error": err, "max_abs_error": float((out.double() - ref).abs().max()),
               "nan": bool(torch.isnan(out).any()), "kernel_ms": None, "sdpa_ms": None}
        if mname == "full":  # the full pattern must also equal plain (un-masked / causal) attention
            plain, _ = dense_reference(q, k, v, causal=is_causal)
            row["full_vs_plain"] = float((out.double() - plain).abs().max())
        if dev == "cuda":
            kk, vv = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
            am = mask.expand(1, heads, Tq, Tk)
            row["kernel_ms"] = time_ms(lambda: attention(q, k, v, p, backend=backend))
            row["sdpa_ms"] = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=am))
        rows.append(row)
    return rows


def analyze(*, device: Optional[str] = None, show_progress: bool = True, **kw) -> Report:
    """analyze: ``run_patterns`` as a ``Report`` (table, JSON, CSV, error bar chart)."""
    import os

    rows = run_patterns(device=device, show_progress=show_progress, **kw)
    be = "triton" if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else "default"
    tol = 1e-4
    summary = {"rows": rows, "all_match_dense": all(r["rel_error"] < tol and not r["nan"] for r in rows),
               "tolerance_rel": tol, "backend_hint": be}

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 3.6))
        lab = [f"{r['pattern']}\n{r['mask'].split(' ')[0]}" for r in rows]
        ax.bar(range(len(rows)), [max(r["rel_error"], 1e-18) for r in rows],
               color=[f"C{i // 3}" for i in range(len(rows))])
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), lab, fontsize=6)
        ax.axhline(tol, color="k", ls="--", lw=0.6)
        ax.set_ylabel("relative error vs float64 dense")
        ax.set_title("CAB patterns through the block-sparse kernel", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Report("patterns", rows, summary, ["pattern", "mask", "Tq", "Tk", "density", "rel_error", "max_abs_error",
                                              "kernel_ms", "sdpa_ms"],
                  "CAB: causal / non-causal x self / cross through the kernels vs dense", plot)
