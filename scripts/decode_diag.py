"""Decode diagnostics on the GPU: kernel launch variants, timer effects, selection cost, grouped attend.

Not a benchmark of record (``sparsattn bench decode`` is): this finds *why* a number is what it is.
Writes ``decode_diag.json`` and prints one line per measurement. Sections:

* ``kernel``: the sparse decode kernel at 128K, batch 8, budgets 1/16 and 1/64, token / page
  selections, over launch variants (fused vs two-kernel split-K merge, pipelining stages, warps,
  block size, split count), each timed with ``triton.testing.do_bench`` (L2 flushed, launches from
  Python) and ``do_bench_cudagraph`` (launch overhead removed); dense SDPA timed the same two ways.
* ``select``: every registered decode method's selection per step (``bench.decode.decode_method_configs``,
  budget 1/16, the last of 4 layers): wall time (do_bench) vs the GPU kernel time
  of one call (torch.profiler), and the number of host syncs in it.
* ``groups``: ``KVCache.attend`` on a layer stored as head groups vs the same rows in one tensor.

Run: ``python scripts/decode_diag.py --out DIR`` (about 2 minutes on an H200).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from sparsattn.bench.decode import decode_method_configs, random_selection
from sparsattn.kernels.sparse_decode import sparse_decode_attention, sparse_decode_reference
from sparsattn.kernels.sparse_decode.triton import sparse_decode_triton
from sparsattn.kv import KVCache
from sparsattn.methods import method_class
from sparsattn.methods.base import SelectContext
from sparsattn.patterns import TokenPattern

RES: dict = {"kernel": [], "select": [], "groups": []}


def t2(fn):
    """(do_bench median ms, cuda-graph median ms)."""
    a = do_bench(fn, warmup=25, rep=100, return_mode="median")
    try:
        b = do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:  # pragma: no cover
        print("cudagraph failed:", e)
        b = float("nan")
    return float(a), float(b)


def gpu_ms(fn) -> tuple[float, int]:
    """Device time of one call summed over the profiler's rows (an over-count: an op row and its kernel
    rows can both carry the same kernel time; use it for the top kernels, not as a total) and the
    number of host syncs (aten::_local_scalar_dense calls) in it."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    tot, syncs = 0.0, 0
    per = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        tot += t
        if t:
            per.append((t, e.key))
        if e.key == "aten::_local_scalar_dense":
            syncs += e.count
    TOP[:] = [(round(t / 1e3, 4), k[:60]) for t, k in sorted(per, reverse=True)[:6]]
    return tot / 1e3, syncs


TOP: list = []


def cpu_us(fn, n=200) -> float:
    """CPU time of one call when the GPU is not the bottleneck (back-to-back calls, no sync)."""
    import time

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def kernel_section(T=131072, B=8, hq=32, hkv=8, d=128):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, hkv, T, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, hkv, T, d, device=dev, dtype=torch.bfloat16)
    kl = torch.full((B,), T, dtype=torch.int32, device=dev)
    q4 = q[:, :, None]
    a, g = t2(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
    dense_bytes = 2 * B * hkv * T * d * 2
    RES["kernel"].append({"impl": "sdpa", "budget": 1.0, "P": 1, "do_bench": a, "graph": g,
                          "TBps_do_bench": dense_bytes / a / 1e9, "TBps_graph": dense_bytes / g / 1e9})
    print(f"sdpa dense: do_bench {a:.4f} ms ({dense_bytes / a / 1e9:.2f} TB/s), graph {g:.4f} ms "
          f"({dense_bytes / g / 1e9:.2f} TB/s)", flush=True)
    scale = 1 / math.sqrt(d)
    variants = [dict(), dict(num_splits=4), dict(num_splits=8), dict(num_splits=12)]
    for budget in (1 / 16,):
        for P in (1, 64):
            n_units = T // P
            count = max(1, round(budget * T / P))
            pat = random_selection(B, hkv, n_units, count, P, T, dev, gen)
            ref = sparse_decode_reference(q[:1], k[:1], v[:1], TokenPattern(pat.indices[:1], pat.counts[:1], T, P),
                                          kv_lens=kl[:1])[0]
            nbytes = 2 * B * hkv * count * P * d * 2 + B * hkv * count * 4
            for var in variants:
                def fn(var=var):
                    return sparse_decode_triton(q, k, v, pat.indices, pat.counts, kl, scale=scale, page_size=P, **var)
                try:
                    err = float((fn()[0][:1].float() - ref.float()).abs().max())
                    a, g = t2(fn)
                    kern, _ = gpu_ms(fn)
                    r = {"impl": "sparse", "budget": budget, "P": P, "variant": var, "do_bench": a, "graph": g,
                         "kernel_ms": kern, "TBps_do_bench": nbytes / a / 1e9, "TBps_graph": nbytes / g / 1e9,
                         "TBps_kernel": nbytes / kern / 1e9, "max_err": err}
                except Exception as e:
                    r = {"impl": "sparse", "budget": budget, "P": P, "variant": var, "error": f"{type(e).__name__}: {e}"[:300]}
                RES["kernel"].append(r)
                print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in r.items()}, flush=True)
    del q, k, v
    torch.cuda.empty_cache()


def select_section(T=131072, B=8, hq=32, hkv=8, d=128):
    dev = torch.device("cuda")
    q = torch.randn(B, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, hkv, T, d, device=dev, dtype=torch.bfloat16)
    kl = torch.full((B,), T, dtype=torch.int32, device=dev)
    n_tok = T // 16
    n_layers = 4
    for name, cfg in decode_method_configs(n_tok, q_heads=hq, kv_heads=hkv, head_dim=d, n_layers=n_layers).items():
        m = method_class(name)(**cfg)
        state: dict = {}
        for layer in range(n_layers - 1):  # earlier layers (dense layers, cross-layer selections), as decoding
            m.select(q, k, SelectContext(layer=layer, phase="decode", kv_lens=kl, state=state))
        ctx = SelectContext(layer=n_layers - 1, phase="decode", kv_lens=kl, state=state)
        m.select(q, k, ctx)
        fn = lambda: m.select(q, k, ctx)  # noqa: E731
        a = do_bench(fn, warmup=25, rep=100, return_mode="median")
        kern, syncs = gpu_ms(fn)
        try:
            g = float(do_bench_cudagraph(fn, rep=100, return_mode="median"))
        except Exception as e:
            g = f"{type(e).__name__}"
        r = {"method": name, "do_bench": float(a), "graph": g, "gpu_kernel_ms": kern, "host_syncs": syncs,
             "cpu_us_per_call": cpu_us(fn, 50), "top_kernels_ms": list(TOP)}
        RES["select"].append(r)
        print(r, flush=True)
    del q, k
    torch.cuda.empty_cache()


def groups_section(T=32768, B=8, hq=32, hkv=8, d=128):
    import sparsattn.kernels.sparse_decode.triton as tri

    dev = torch.device("cuda")
    cases = {"razor_like": [T] + [2048] * (hkv - 1),
             "moa_like": [T, T * 3 // 4, T // 2, T * 3 // 8, T // 4, T * 3 // 16, T // 8, T // 16]}
    q = torch.randn(B, hq, d, device=dev, dtype=torch.bfloat16)
    orig = tri.sparse_decode_triton
    for name, lens in cases.items():
        k = torch.randn(B, hkv, T, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, hkv, T, d, device=dev, dtype=torch.bfloat16)
        L = torch.tensor(lens, device=dev)[None].expand(B, hkv).contiguous()
        ref = sparse_decode_reference(q, k, v, None, kv_lens=L)[0].float()
        pos = torch.arange(T, device=dev).expand(B, hkv, T)
        r = {"case": name}
        for waste in (0.1, 1.0):
            c = KVCache(1, B, hkv, d, dtype=torch.bfloat16, device=dev, group_waste=waste)
            c.load_layer(0, k, v, L, pos, torch.full((B,), T, device=dev))
            c.shrink()
            tag = "grouped" if waste < 1 else "single"
            r[f"{tag}_groups"] = 1 if c.layers[0].groups is None else len(c.layers[0].groups)
            r[f"{tag}_bytes"] = c.nbytes(0)
            for fused in (True, False):
                tri.sparse_decode_triton = lambda *a, _f=fused, **kw: orig(*a, fused_merge=_f, **kw)
                try:
                    fn = lambda: c.attend(0, q, validate=False)  # noqa: E731
                    r[f"{tag}_fused{int(fused)}_err"] = float((fn().float() - ref).abs().max())
                    r[f"{tag}_fused{int(fused)}_ms"] = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
                    if fused and waste < 1:  # the single-tensor path checks lengths on the host: no capture
                        try:
                            r[f"{tag}_graph_ms"] = float(do_bench_cudagraph(fn, rep=100, return_mode="median"))
                        except Exception as e:
                            r[f"{tag}_graph_ms"] = f"{type(e).__name__}: {str(e)[:80]}"
                        r[f"{tag}_cpu_us"] = cpu_us(fn, 50)
                finally:
                    tri.sparse_decode_triton = orig
            # a token-index pattern over every kept slot (the path a decode method's selection takes)
            idx = torch.arange(T, device=dev, dtype=torch.int32).expand(B, hkv, T).contiguous()
            pat = TokenPattern(idx, L.to(torch.int32), T)
            fn = lambda: c.attend(0, q, pat, validate=False)  # noqa: E731
            r[f"{tag}_pattern_err"] = float((fn().float() - ref).abs().max())
            r[f"{tag}_pattern_ms"] = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            del c
        r["sdpa_full_ms"] = float(do_bench(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True),
                                           warmup=25, rep=100, return_mode="median"))
        RES["groups"].append(r)
        print(r, flush=True)
        del k, v
        torch.cuda.empty_cache()


def launch_section(T=131072, B=8, hq=32, hkv=8, d=128):
    """CPU cost of one call of each entry point (the GPU is idle-bound only if this exceeds the GPU time)."""
    dev = torch.device("cuda")
    q = torch.randn(B, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, hkv, T, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, hkv, T, d, device=dev, dtype=torch.bfloat16)
    kl = torch.full((B,), T, dtype=torch.int32, device=dev)
    gen = torch.Generator().manual_seed(0)
    pat = random_selection(B, hkv, T, T // 16, 1, T, dev, gen)
    scale = 1 / math.sqrt(d)
    cases = {
        "sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True),
        "empty_like x1": lambda: torch.empty_like(q),
        "sparse_decode_triton": lambda: sparse_decode_triton(q, k, v, pat.indices, pat.counts, kl, scale=scale,
                                                             page_size=1),
        "sparse_decode_attention(validate=False)": lambda: sparse_decode_attention(q, k, v, pat, kv_lens=kl,
                                                                                    validate=False),
        "sparse_decode_attention(validate=True)": lambda: sparse_decode_attention(q, k, v, pat, kv_lens=kl),
    }
    for name, fn in cases.items():
        r = {"call": name, "cpu_us": cpu_us(fn, 100 if "sdpa" not in name else 20)}
        RES.setdefault("launch", []).append(r)
        print(r, flush=True)
    del q, k, v
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sections", nargs="*", default=["kernel", "select", "launch", "groups"])
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    RES["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for s in a.sections:
        try:
            {"kernel": kernel_section, "select": select_section, "groups": groups_section,
             "launch": launch_section}[s]()
        except Exception as e:
            import traceback

            traceback.print_exc()
            RES.setdefault("errors", []).append(f"{s}: {type(e).__name__}: {e}"[:500])
        with open(os.path.join(a.out, "decode_diag.json"), "w") as f:
            json.dump(RES, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
