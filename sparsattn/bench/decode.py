"""Decode benchmark: sparse decode kernel vs dense SDPA decode and FlexAttention decode, one run.

Per (context length T, batch B) it times, for one new query token (GQA Hq/Hkv, head_dim D):

* ``sdpa_dense``: ``F.scaled_dot_product_attention`` over the whole cache (``enable_gqa``);
* ``flex_dense``: compiled FlexAttention over the whole cache; ``flex_pages128``: FlexAttention
  with a block mask keeping the same budget as 128-token pages;
* ``sparse_dense``: this library's decode kernel with ``pattern=None`` (bandwidth check);
* ``sparse_tokens`` / ``sparse_pages16``: the kernel on a random selection of ``budget * T``
  tokens (or 16-token pages) per (sequence, KV head), index selection excluded;
* ``<method>+kernel``: every registered decode method with a budget preset (``Method.budget_config``;
  the ``slow`` ones only when named; a calibrated one on a calibration fitted on random q/k): its
  incremental selection and the kernel together (index selection included; ``select_ms`` reports
  the selection alone).

Bandwidth is computed on the bytes actually read (selected K/V rows of each KV head once, the
indices, q and the output). Outputs are checked against the torch reference on sequence 0 before
timing. GPU timing, two columns per row, every ratio against dense SDPA timed the same way in the
same run: ``ms`` = ``triton.testing.do_bench(..., return_mode="median")`` (launches from Python: a
call that runs shorter on the GPU than its Python launch takes measures the CPU), ``graph_ms`` =
``do_bench_cudagraph`` (the call captured in a CUDA graph and replayed, as serving engines decode:
the GPU time; empty when the call cannot be captured). CPU (``--tiny``): median wall time of a few
calls (smoke test only).

Run: ``python -m sparsattn.bench.decode --out decode.csv`` (GPU), ``--tiny`` on the CPU.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..kernels.sparse_decode import sparse_decode_attention, sparse_decode_reference
from ..methods.base import SelectContext
from ..patterns import TokenPattern

FIELDS = ["impl", "T", "B", "Hq", "Hkv", "D", "dtype", "budget", "page_size", "ms", "select_ms", "speedup_vs_sdpa",
          "bytes_read", "GBps", "graph_ms", "speedup_graph", "GBps_graph", "max_err", "note", "device", "torch",
          "triton"]


def _time(fn: Callable, device: torch.device, reps: int) -> tuple[float, Optional[float]]:
    """(median ms with launches from Python, median ms replaying a CUDA graph of the call or None).

    GPU: ``triton.testing.do_bench`` (L2 flushed before each call, launches from Python: a call
    shorter than its own Python launch cost measures the CPU) and ``do_bench_cudagraph`` (the same
    call captured once and replayed: the GPU time, as a serving engine that decodes under CUDA
    graphs sees it; None when the call cannot be captured, e.g. it syncs with the host). CPU: the
    median wall time of ``reps`` calls (smoke test only) and None."""
    if device.type == "cuda":
        import triton

        ms = float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        try:
            g = float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
        except Exception as e:  # capture refused (host sync, unsupported op)
            print(f"  (no CUDA-graph timing: {type(e).__name__}: {str(e)[:80]})", flush=True)
            g = None
        return ms, g
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), None


def random_selection(B: int, H: int, n_units: int, count: int, page_size: int, T: int, device, gen) -> TokenPattern:
    """Sorted random unit indices, ``count`` per (batch, head), as a TokenPattern."""
    count = max(1, min(count, n_units))
    scores = torch.rand(B, H, n_units, generator=gen, device="cpu").to(device)
    idx = scores.topk(count, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
    cnt = torch.full((B, H), count, dtype=torch.int32, device=device)
    return TokenPattern(idx, cnt, T, page_size)


def _bytes(B, Hq, Hkv, D, item, n_tokens_per_row: float, n_idx_per_row: float) -> int:
    kv = 2 * B * Hkv * n_tokens_per_row * D * item
    return int(kv + B * Hkv * n_idx_per_row * 4 + 2 * B * Hq * D * item)


def run_decode_bench(lengths: Sequence[int] = (32768, 131072), batches: Sequence[int] = (1, 8),
                     budgets: Sequence[float] = (1 / 16, 1 / 64), hq: int = 32, hkv: int = 8, d: int = 128,
                     dtype: torch.dtype = torch.bfloat16, device: Optional[str] = None, out_csv: Optional[str] = None,
                     page_sizes: Sequence[int] = (1, 16),
                     flex: bool = True, methods=True, reps: int = 5, check: bool = True,
                     tune: bool = True) -> list[dict]:
    """run_decode_bench: per-token decode latency of the sparse kernel vs dense SDPA and Flex (CSV rows).

    Args:
        lengths, batches, budgets: the sweep (budget = fraction of T read per (sequence, KV head)).
        hq, hkv, d, dtype: attention shape (defaults: GQA 32/8, D 128, bf16).
        device: "cuda" when available, else "cpu" (use tiny sizes there).
        out_csv: path of the CSV written at the end (also printed as a short table).
        flex: include FlexAttention rows (CUDA only); methods: include the decode methods' rows (True:
            every registered one with a budget preset except the ``slow`` ones; a list: those names).
        tune: on CUDA, also time kernel configurations (block_n, num_warps, splits) at the largest
            (T, B) and the first budget, rows ``sparse_tokens[bn=..,w=..,s=..]`` (and pages16).
        page_sizes: granularities of the kernel rows: 1 = token indices, P > 1 = P-token pages.
    Returns the list of row dicts.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    import triton

    backend = "triton" if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    item = torch.empty(0, dtype=dtype).element_size()
    versions = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "torch": torch.__version__, "triton": triton.__version__}
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    flex_fn = None
    if flex and dev.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            import torch._dynamo as dynamo

            # every (shape, block mask) pair compiles once; keep them all compiled (PERF.md: after 8
            # recompiles Flex falls back to an unfused path)
            for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
                if hasattr(dynamo.config, knob):
                    setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
            flex_fn = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # pragma: no cover - depends on the torch build
            print(f"flex unavailable: {e}", file=sys.stderr)

    def row(impl, T, B, budget, P, t, sel_ms, sdpa_t, nbytes, err, note=""):
        ms, g = t if isinstance(t, tuple) else (t, None)
        sdpa_ms, sdpa_g = sdpa_t if isinstance(sdpa_t, tuple) else (sdpa_t, None)
        r = {"impl": impl, "T": T, "B": B, "Hq": hq, "Hkv": hkv, "D": d, "dtype": str(dtype).replace("torch.", ""),
             "budget": budget, "page_size": P, "ms": round(ms, 5) if ms is not None else None,
             "select_ms": round(sel_ms, 5) if sel_ms is not None else None,
             "speedup_vs_sdpa": round(sdpa_ms / ms, 3) if ms and sdpa_ms else None,
             "bytes_read": nbytes, "GBps": round(nbytes / (ms * 1e-3) / 1e9, 1) if ms and nbytes else None,
             "graph_ms": round(g, 5) if g else None,
             "speedup_graph": round(sdpa_g / g, 3) if g and sdpa_g else None,
             "GBps_graph": round(nbytes / (g * 1e-3) / 1e9, 1) if g and nbytes else None,
             "max_err": err, "note": note, **versions}
        rows.append(r)
        print(f"{impl:>24} T={T:>6} B={B} budget={budget!s:>8} P={P:>2}: {r['ms']} ms  {r['GBps']} GB/s  "
              f"x{r['speedup_vs_sdpa']} vs sdpa | graph {r['graph_ms']} ms {r['GBps_graph']} GB/s "
              f"x{r['speedup_graph']}  err={err} {note}", flush=True)

    for T in lengths:
        for B in batches:
            q = torch.randn(B, hq, d, device=dev, dtype=dtype)
            k = torch.randn(B, hkv, T, d, device=dev, dtype=dtype)
            v = torch.randn(B, hkv, T, d, device=dev, dtype=dtype)
            kv_lens = torch.full((B,), T, dtype=torch.int32, device=dev)
            q4 = q[:, :, None]
            dense_bytes = _bytes(B, hq, hkv, d, item, T, 0)
            try:
                sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)  # noqa: E731
                sdpa_ms = _time(sdpa, dev, reps)
                row("sdpa_dense", T, B, 1.0, 1, sdpa_ms, None, sdpa_ms, dense_bytes, None)
            except Exception as e:
                sdpa_ms = None
                row("sdpa_dense", T, B, 1.0, 1, None, None, None, dense_bytes, None, f"failed: {type(e).__name__}: {e}"[:200])
            if flex_fn is not None:
                try:
                    ms = _time(lambda: flex_fn(q4, k, v, enable_gqa=True), dev, reps)
                    row("flex_dense", T, B, 1.0, 1, ms, None, sdpa_ms, dense_bytes, None)
                except Exception as e:
                    row("flex_dense", T, B, 1.0, 1, None, None, sdpa_ms, dense_bytes, None, f"failed: {type(e).__name__}: {e}"[:200])
            ref0 = None
            if check:
                ref0 = lambda p, lw=None: sparse_decode_reference(q[:1], k[:1], v[:1], p, kv_lens=kv_lens[:1])[0]  # noqa: E731
            fn = lambda: sparse_decode_attention(q, k, v, None, kv_lens=kv_lens, backend=backend, validate=False)  # noqa: E731
            try:
                err = float((fn()[:1].float() - ref0(None).float()).abs().max()) if check else None
                row("sparse_dense", T, B, 1.0, 1, _time(fn, dev, reps), None, sdpa_ms, dense_bytes, err)
            except Exception as e:
                row("sparse_dense", T, B, 1.0, 1, None, None, sdpa_ms, dense_bytes, None, f"failed: {type(e).__name__}: {e}"[:200])
            for budget in budgets:
                for P in page_sizes:
                    impl = "sparse_tokens" if P == 1 else f"sparse_pages{P}"
                    n_units = -(-T // P)
                    count = max(1, round(budget * T / P))
                    nbytes = _bytes(B, hq, hkv, d, item, count * P, count)
                    try:
                        pat = random_selection(B, hkv, n_units, count, P, T, dev, gen)
                        fn = lambda: sparse_decode_attention(q, k, v, pat, kv_lens=kv_lens, backend=backend,  # noqa: E731
                                                             validate=False)
                        err = None
                        if check:
                            p0 = TokenPattern(pat.indices[:1], pat.counts[:1], T, P)
                            err = float((fn()[:1].float() - ref0(p0).float()).abs().max())
                        row(impl, T, B, budget, P, _time(fn, dev, reps), None, sdpa_ms, nbytes, err)
                        if tune and dev.type == "cuda" and T == max(lengths) and B == max(batches) and budget == budgets[0]:
                            _config_rows(row, impl, q, k, v, pat, kv_lens, T, B, budget, P, dev, reps, sdpa_ms, nbytes)
                    except Exception as e:
                        row(impl, T, B, budget, P, None, None, sdpa_ms, nbytes, None, f"failed: {type(e).__name__}: {e}"[:200])
                if flex_fn is not None:
                    try:
                        nb = -(-T // 128)
                        cb = max(1, round(budget * T / 128))
                        sel = random_selection(B, hkv, nb, cb, 128, T, dev, gen).to_unit_mask()  # [B, Hkv, nb]
                        G = hq // hkv

                        def page_mask(b, h, q_idx, kv_idx, sel=sel, G=G):
                            return sel[b, h // G, kv_idx // 128]

                        bm = create_block_mask(page_mask, B, hq, 1, T, device=dev, BLOCK_SIZE=128)
                        ms = _time(lambda: flex_fn(q4, k, v, block_mask=bm, enable_gqa=True), dev, reps)
                        row("flex_pages128", T, B, budget, 128, ms, None, sdpa_ms, _bytes(B, hq, hkv, d, item, cb * 128, 0), None)
                    except Exception as e:
                        row("flex_pages128", T, B, budget, 128, None, None, sdpa_ms, 0, None, f"failed: {type(e).__name__}: {e}"[:200])
                if methods:
                    _method_rows(row, q, k, v, kv_lens, T, B, budget, backend, dev, reps, sdpa_ms, hq, hkv, d, item,
                                 methods=None if methods is True else list(methods))
            del q, k, v
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    _summary(rows)
    if out_csv:
        os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
        with open(out_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
        png = os.path.splitext(out_csv)[0] + ".png"
        plot_decode(out_csv, png)
        print(f"wrote {out_csv}, {png}")
    return rows


def _config_rows(row, impl, q, k, v, pat, kv_lens, T, B, budget, P, dev, reps, sdpa_ms, nbytes):
    """Kernel launch configurations on one case (the defaults are block_n 64, 4 warps, auto splits)."""
    from ..kernels.sparse_decode.triton import sparse_decode_triton

    scale = 1.0 / math.sqrt(q.shape[-1])
    for bn in (32, 64, 128):
        for w in (4, 8):
            for sp in (None, 2, 8, 16):
                def fn(bn=bn, w=w, sp=sp):
                    return sparse_decode_triton(q, k, v, pat.indices, pat.counts, kv_lens, scale=scale, page_size=P,
                                                block_n=bn, num_warps=w, num_splits=sp)
                try:
                    row(f"{impl}[bn={bn},w={w},s={sp or 'auto'}]", T, B, budget, P, _time(fn, dev, reps), None,
                        sdpa_ms, nbytes, None)
                except Exception as e:
                    row(f"{impl}[bn={bn},w={w},s={sp or 'auto'}]", T, B, budget, P, None, None, sdpa_ms, nbytes,
                        None, f"failed: {type(e).__name__}: {e}"[:200])


def _state_bytes(x) -> int:
    """Bytes of the tensors held (recursively) in a method's ``ctx.state`` entry."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_state_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_state_bytes(v) for v in x)
    return 0


def decode_method_configs(budget_tokens: int, *, q_heads: int, kv_heads: int, head_dim: int, n_layers: int = 4,
                          methods=None, skipped: Optional[dict] = None, seed: int = 1) -> dict:
    """decode_method_configs: ``{name: get_method kwargs}`` of every registered decode method at a budget
    of ``budget_tokens`` tokens per KV head (``Method.budget_config``). A method that needs a calibration
    gets one fitted on random q/k (``calibrate_from_qk``, ``n_layers`` layers of 64 tokens) or a random
    calibration file (``Calibrated.random_calibration``): its cost does not depend on the fitted values.
    ``methods``: names to keep (None: all but the ``slow`` ones). Methods left out are reported in
    ``skipped`` ({name: reason}) when given."""
    import tempfile

    from ..methods import list_methods, method_class
    from ..methods.base import Calibrated, PresetContext

    ctx = PresetContext(n_layers=n_layers, n_heads=q_heads, group_size=q_heads // kv_heads)
    skipped = skipped if skipped is not None else {}
    out = {}
    for name in list_methods("decode"):
        cls = method_class(name)
        if methods is not None and name not in methods:
            continue
        if methods is None and cls.slow:
            skipped[name] = f"slow: {cls.slow}"
            continue
        cfg = cls.budget_config(budget_tokens, ctx)
        if cfg is None:
            skipped[name] = "no budget_config preset"
            continue
        cfg = dict(cfg)
        if cls.needs:
            g = torch.Generator(device="cpu").manual_seed(seed)
            qs = [torch.randn(1, q_heads, 64, head_dim, generator=g) for _ in range(n_layers)]
            ks = [torch.randn(1, kv_heads, 64, head_dim, generator=g) for _ in range(n_layers)]
            fitted = cls.calibrate_from_qk(qs, ks, cfg)
            if fitted is None and issubclass(cls, Calibrated):
                path = cls.random_calibration(os.path.join(tempfile.mkdtemp(prefix="sparsattn_decode_bench_"), name),
                                              q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                                              layers=n_layers, seed=seed)
                fitted = None if path is None else {"path": path}
            if fitted is None:
                skipped[name] = f"needs {', '.join(cls.needs)} and provides no random one"
                continue
            cfg.update(fitted)
        out[name] = cfg
    return out


def _method_rows(row, q, k, v, kv_lens, T, B, budget, backend, dev, reps, sdpa_ms, hq, hkv, d, item, methods=None):
    """Every registered decode method with a budget preset: incremental selection (its ``ctx.state``
    warmed on the layers before, as in decoding) + the kernel, on the last of 4 layers. The bytes
    read add the index metadata the method keeps for that layer (the tensors of its ``ctx.state``
    entry: page bounds, label cache...)."""
    from ..methods import method_class

    n_layers, n_tok = 4, max(16, round(budget * T))
    skipped: dict = {}
    for name, cfg in decode_method_configs(n_tok, q_heads=hq, kv_heads=hkv, head_dim=d, n_layers=n_layers,
                                           methods=methods, skipped=skipped).items():
        try:
            m = method_class(name)(**cfg)
            state: dict = {}
            for layer in range(n_layers - 1):  # earlier layers (dense layers, cross-layer selections)
                m.select(q, k, SelectContext(layer=layer, phase="decode", kv_lens=kv_lens, state=state))
            before = _state_bytes(state)
            ctx = SelectContext(layer=n_layers - 1, phase="decode", kv_lens=kv_lens, state=state)
            m.select(q, k, ctx)  # builds the incremental metadata (prefill), as a real decode would
            meta = _state_bytes(state) - before

            def sel():
                return m.select(q, k, ctx)

            pat = sel()
            P = pat.page_size
            n = int(pat.counts.float().mean()) * P

            def both():
                return sparse_decode_attention(q, k, v, sel(), kv_lens=kv_lens, backend=backend, validate=False)

            sel_ms = _time(sel, dev, reps)[0]
            ms = _time(both, dev, reps)
            row(f"{name}+kernel", T, B, budget, P, ms, sel_ms, sdpa_ms,
                _bytes(B, hq, hkv, d, item, n, n // P) + meta, None, "selection included")
        except Exception as e:
            row(f"{name}+kernel", T, B, budget, 0, None, None, sdpa_ms, 0, None, f"failed: {type(e).__name__}: {e}"[:200])
    for name, why in skipped.items():
        print(f"  {name}: not timed ({why})", flush=True)


_PLOT_IMPLS = ("sparse_tokens", "sparse_pages16", "sparse_pages64", "flex_pages128")  # + every "<method>+kernel" row


def plot_decode(csv_path, png_path) -> str:
    """plot_decode: figure of a decode-benchmark CSV: speed-up over dense SDPA per case (bars: CUDA-graph
    timing where present, else the Python-launch timing; dots: the Python-launch timing) and the read
    bandwidth of the kernel rows against dense SDPA's in the same run. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("ms")]
    if not rows:
        raise ValueError(f"csv_path: no timed rows in {csv_path}")

    def num(r, k):
        v = r.get(k)
        return float(v) if v not in (None, "", "None") else None

    plotted = _PLOT_IMPLS + tuple(dict.fromkeys(r["impl"] for r in rows if r["impl"].endswith("+kernel")))
    cases = []
    for r in rows:
        if r["impl"] in plotted:
            c = (int(r["T"]), int(r["B"]), float(r["budget"]))
            if c not in cases:
                cases.append(c)
    cases.sort(key=lambda c: (c[0], c[1], -c[2]))
    impls = [i for i in plotted if any(r["impl"] == i for r in rows)]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8.0, 1.3 * len(cases) + 3), 8.5))
    w = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        xs, ys, dots = [], [], []
        for i, c in enumerate(cases):
            r = next((r for r in rows if r["impl"] == impl and (int(r["T"]), int(r["B"]), float(r["budget"])) == c), None)
            if r is None:
                continue
            g, m = num(r, "speedup_graph"), num(r, "speedup_vs_sdpa")
            if g is None and m is None:
                continue
            xs.append(i + (j - (len(impls) - 1) / 2) * w)
            ys.append(g if g is not None else m)
            dots.append(m)
        bars = a1.bar(xs, ys, width=w, label=impl)
        a1.scatter([x for x, d in zip(xs, dots) if d is not None], [d for d in dots if d is not None], s=12,
                   color=bars.patches[0].get_facecolor() if bars.patches else None, edgecolors="black",
                   linewidths=0.5, zorder=3)
    labels = [f"{T // 1024}K B{B}\n1/{round(1 / b)}" for T, B, b in cases]
    a1.axhline(1.0, color="grey", lw=0.8)
    a1.axhline(10.0, color="red", lw=0.8, ls="--", label="target: 10x (128K, 1/16, B8)")
    a1.set_yscale("log")
    a1.set_xticks(range(len(cases)))
    a1.set_xticklabels(labels, fontsize=8)
    a1.set_ylabel("x faster than dense SDPA decode")
    a1.set_title("decode: bars = CUDA-graph replay, dots = launches from Python (do_bench)", fontsize=10)
    a1.legend(fontsize=7, ncol=3)
    kern = [i for i in impls if i.startswith("sparse_")]
    for j, impl in enumerate(kern):
        xs, ys = [], []
        for i, c in enumerate(cases):
            r = next((r for r in rows if r["impl"] == impl and (int(r["T"]), int(r["B"]), float(r["budget"])) == c), None)
            v = None if r is None else (num(r, "GBps_graph") or num(r, "GBps"))
            if v is not None:
                xs.append(i + (j - (len(kern) - 1) / 2) * (0.8 / max(len(kern), 1)))
                ys.append(v / 1e3)
        a2.bar(xs, ys, width=0.8 / max(len(kern), 1), label=impl)
    for i, c in enumerate(cases):
        r = next((r for r in rows if r["impl"] == "sdpa_dense" and (int(r["T"]), int(r["B"])) == c[:2]), None)
        v = None if r is None else (num(r, "GBps_graph") or num(r, "GBps"))
        if v is not None:
            a2.hlines([v / 1e3, 0.8 * v / 1e3], i - 0.45, i + 0.45, colors=["black", "red"], linestyles=["-", "--"], lw=1)
    a2.set_xticks(range(len(cases)))
    a2.set_xticklabels(labels, fontsize=8)
    a2.set_ylabel("TB/s on the bytes read")
    a2.set_title("read bandwidth (black: dense SDPA in the same run, red dashed: 80% of it)", fontsize=10)
    a2.legend(fontsize=7)
    dev = rows[0].get("device", "")
    fig.suptitle(f"sparse decode vs dense SDPA ({dev}, torch {rows[0].get('torch', '')}, triton {rows[0].get('triton', '')})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return str(png_path)


def _summary(rows: list[dict]) -> None:
    print("\n impl                      T       B  budget    ms        GB/s    x vs sdpa | graph ms  GB/s    x vs sdpa")
    for r in rows:
        if r["ms"] is None:
            continue
        print(f" {r['impl']:<24} {r['T']:>7} {r['B']:>2}  {float(r['budget']):<8.4f} {r['ms']:<9} {r['GBps']!s:<7} "
              f"{r['speedup_vs_sdpa']!s:<9} | {r['graph_ms']!s:<9} {r['GBps_graph']!s:<7} {r['speedup_graph']}")


def _methods_arg(a) -> object:
    if a.no_methods:
        return False
    return a.methods.split(",") if a.methods else True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny CPU smoke test")
    ap.add_argument("--out", default=None, help="CSV path (default $OUT/decode_bench.csv when $OUT is set)")
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-methods", action="store_true")
    ap.add_argument("--methods", default=None, help="comma-separated decode methods (default: every registered one "
                                                    "with a budget preset, the slow ones left out)")
    ap.add_argument("--no-tune", action="store_true", help="skip the kernel configuration sweep")
    ap.add_argument("--plot", default=None, metavar="CSV", help="only draw the figure of an existing CSV (PNG beside it)")
    ap.add_argument("--page-sizes", type=int, nargs="*", default=None,
                    help="selection granularities of the kernel rows (default 1 16: tokens and 16-token pages)")
    a = ap.parse_args(argv)
    if a.plot:
        print(plot_decode(a.plot, os.path.splitext(a.plot)[0] + ".png"))
        return 0
    out = a.out or (os.path.join(os.environ["OUT"], "decode_bench.csv") if os.environ.get("OUT") else None)
    if a.tiny:
        run_decode_bench(lengths=a.lengths or (256, 700), batches=a.batches or (1, 2), budgets=(1 / 16, 1 / 64),
                         hq=4, hkv=2, d=64, dtype=torch.float32, device="cpu", out_csv=out, flex=False,
                         methods=_methods_arg(a), reps=2, page_sizes=tuple(a.page_sizes or (1, 16)))
    else:
        run_decode_bench(lengths=a.lengths or (32768, 131072), batches=a.batches or (1, 8), out_csv=out,
                         flex=not a.no_flex, methods=_methods_arg(a), tune=not a.no_tune,
                         page_sizes=tuple(a.page_sizes or (1, 16)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
