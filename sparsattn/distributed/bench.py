"""Context-parallel benchmark: time per forward and forward+backward, bytes moved per rank and the
compute / communication split of ``context_parallel_attention`` against dense ring attention with
the same split and torch.distributed's own context-parallel SDPA (where it runs); one CSV row per
measurement (distributed multi-head attention of arXiv 2302.06218; Ring Attention arXiv 2310.01889).

Run inside every rank (``scripts/cp_bench.py`` starts them: torchrun on GPUs with NCCL, or
``--spawn N`` gloo processes on the CPU). Rank 0 writes the CSV.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from .. import patterns as P
from .attention import context_parallel_attention
from .comm import CPStats
from .layout import make_layout, shard
from .plan import build_plan
from .subpattern import rank_rows

COLUMNS = ["date", "device", "dist_backend", "world", "seq_len", "batch", "q_heads", "kv_heads", "head_dim", "dtype",
           "pattern", "target_density", "density", "method", "strategy", "layout", "mode", "ms", "ms_min",
           "bytes_recv_max", "bytes_recv_mean", "bytes_sent_max", "dense_ring_bytes_recv_max", "bytes_vs_dense_ring",
           "compute_ms", "wait_ms", "link_gbps", "hidden_share", "max_err", "status"]


def make_pattern(kind: str, T: int, density: float, block: int, heads: int, device, seed: int = 0):
    """The benchmark's global pattern: ``dense`` (causal), ``local`` (sink + causal window sized to
    ``density``), or ``random`` (per KV head, each causal block kept with probability ``density``,
    diagonal always kept)."""
    if kind == "dense" or density >= 1.0:
        return P.causal(T, block_q=block, device=device)
    if kind == "local":
        window = max(block, int(density * T / 2) // block * block)
        return P.sink_local(T, block, window, block_q=block, device=device)
    if kind == "random":
        nb = -(-T // block)
        g = torch.Generator(device=device).manual_seed(seed)
        sel = torch.rand(1, heads, nb, nb, generator=g, device=device) < density
        sel |= torch.eye(nb, dtype=torch.bool, device=device)
        return P.from_block_mask(sel, block_size=block, q_len=T, causal=True)
    raise ValueError(f"pattern: expected 'dense', 'local' or 'random', got {kind!r}")


def _max_all(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _sum_all(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, reps: int, device) -> tuple[float, float]:
    """(median, min) milliseconds over ``reps`` runs, each started together (barrier), the slowest
    rank's time per run."""
    fn()
    ts = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(_max_all((time.perf_counter() - t0) * 1e3, device))
    ts.sort()
    return ts[len(ts) // 2], ts[0]


def link_gbps(device, mb: int = 64) -> float:
    """Point-to-point bandwidth (GB/s) of one exchange with the ring neighbours (for the hidden
    share estimate)."""
    W, r = dist.get_world_size(), dist.get_rank()
    if W == 1:
        return float("inf")
    n = mb * (1 << 20) // 4
    a = torch.ones(n, device=device)
    b = torch.empty(n, device=device)

    def step():
        ops = [dist.P2POp(dist.isend, a, (r + 1) % W), dist.P2POp(dist.irecv, b, (r - 1) % W)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    ms, _ = _time(step, 3, device)
    return n * 4 / (ms / 1e3) / 1e9


def _inputs(T, B, Hq, Hkv, D, dtype, device, layout, rank, seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    full = [torch.randn(B, h, T, D, generator=g, device=device, dtype=dtype) for h in (Hq, Hkv, Hkv)]
    return full, [shard(t, layout, rank) for t in full]


_MESHES: dict = {}


def _torch_cp(T, B, Hq, D, dtype, device, reps, mode) -> tuple[Optional[float], Optional[float], str]:
    """torch.distributed's context-parallel SDPA (dense causal; KV heads expanded to Hq)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        import torch.nn.functional as F

        key = (device.type, dist.get_world_size())
        if key not in _MESHES:
            _MESHES[key] = init_device_mesh(device.type, (dist.get_world_size(),))
        mesh = _MESHES[key]
        g = torch.Generator(device=device).manual_seed(1)
        q, k, v = (torch.randn(B, Hq, T, D, generator=g, device=device, dtype=dtype) for _ in range(3))
        bufs = [q, k, v]
        with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2], no_restore_buffers=set(bufs)):
            ql, kl, vl = (t.detach().requires_grad_(mode == "fwd+bwd") for t in bufs)

            def run():
                o = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
                if mode == "fwd+bwd":
                    o.sum().backward()

            ms, ms_min = _time(run, reps, device)
        return ms, ms_min, "ok"
    except Exception as e:  # recorded in the CSV: where it does not run and why
        return None, None, f"not run: {type(e).__name__}: {str(e)[:120]}"


def _check_err(out_local, full, pattern, layout, rank, backend) -> float:
    """Max abs difference between this rank's output and single-device attention of its rows on
    the whole sequence (the same kernel, no communication)."""
    from .. import api

    q, k, v = full
    sub = rank_rows(pattern, layout, rank)
    ql = shard(q, layout, rank)
    if sub is None or ql.shape[2] == 0:
        return float(out_local.abs().max()) if out_local.numel() else 0.0
    ref = api.attention(ql, k, v, sub, backend=backend)
    return float((out_local.float() - ref.float()).abs().max())


def run(args) -> list[dict]:
    """Measure every (length, pattern, density, method, mode) of ``args`` on this rank; rows on rank 0."""
    from .._environment import environment

    device = torch.device(args.device)
    rank, W = dist.get_rank(), dist.get_world_size()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    env = environment()
    gbps = link_gbps(device)
    rows = []
    B, Hq, Hkv, D = args.batch, args.q_heads, args.kv_heads, args.head_dim
    for T in args.seq_lens:
        dense_p = make_pattern("dense", T, 1.0, args.block, Hkv, device)
        layout = make_layout(args.layout, T, W, args.block)
        full, (q, k, v) = _inputs(T, B, Hq, Hkv, D, dtype, device, layout, rank)
        ring_plans = [build_plan(dense_p, layout, r, "shared") for r in range(W)]
        kv_row = 2 * B * Hkv * D * q.element_size()
        dense_ring = max(p.bytes_estimate("ring", kv_row, 0) for p in ring_plans)  # forward; replaced by
        # the measured dense ring row of the same mode when the run has one (relative_to_dense_ring)
        for kind, dens in [(pk, d) for pk in args.patterns for d in args.densities]:
            if (kind == "dense") != (dens >= 1.0):
                continue
            pat = make_pattern(kind, T, dens, args.block, Hkv, device)
            methods = [("sparsattn", s) for s in args.strategies]
            if kind == "dense" and args.torch_cp:
                methods.append(("torch_cp", "ring"))
            if W == 1:  # the one-device baseline: sparsattn.attention on the global pattern
                methods.append(("single_device", "none"))
            for method, strat in methods:
                for mode in args.modes:
                    row = dict(date=env["date"], device=env["device"], dist_backend=dist.get_backend(), world=W,
                               seq_len=T, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, dtype=args.dtype,
                               pattern=kind, target_density=dens, density=round(pat.density, 4), method=method,
                               strategy=strat, layout=args.layout, mode=mode, link_gbps=round(gbps, 2),
                               dense_ring_bytes_recv_max=dense_ring)
                    if method == "single_device":
                        ms, ms_min = _time_single(q, k, v, pat, mode, args, device)
                        row.update(ms=ms, ms_min=ms_min, bytes_recv_max=0, status="ok")
                        rows.append(row)
                        continue
                    if method == "torch_cp":
                        ms, ms_min, status = _torch_cp(T, B, Hq, D, dtype, device, args.reps, mode)
                        row.update(ms=ms, ms_min=ms_min, status=status)
                        rows.append(row)
                        continue
                    try:
                        row.update(_measure(q, k, v, pat, layout, strat, mode, args, device))
                        if args.check and mode == "fwd":
                            out = context_parallel_attention(q, k, v, pat, layout=layout, strategy=strat,
                                                             backend=args.kernel_backend)
                            row["max_err"] = _max_all(_check_err(out, full, pat, layout, rank, args.kernel_backend),
                                                      device)
                        row["status"] = "ok"
                    except Exception as e:  # one failed configuration (e.g. out of memory) is a row
                        row["status"] = f"error: {type(e).__name__}: {str(e)[:160]}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                    if rank == 0 and args.verbose:
                        print({c: row.get(c) for c in ("seq_len", "pattern", "density", "method", "strategy", "mode",
                                                        "ms", "bytes_recv_max", "compute_ms", "wait_ms", "status")},
                              flush=True)
    return rows


def _time_single(q, k, v, pat, mode, args, device) -> tuple[float, float]:
    """(median, min) ms of ``sparsattn.attention`` on the whole sequence (one device)."""
    from .. import api

    train = mode == "fwd+bwd"
    qq, kk, vv = (t.detach().requires_grad_(train) for t in (q, k, v))
    do = torch.randn_like(q) if train else None

    def call():
        out = api.attention(qq, kk, vv, pat, backend=args.kernel_backend)
        if train:
            out.backward(do)

    ms, ms_min = _time(call, args.reps, device)
    return round(ms, 3), round(ms_min, 3)


def _measure(q, k, v, pat, layout, strat, mode, args, device) -> dict:
    train = mode == "fwd+bwd"
    qq, kk, vv = (t.detach().requires_grad_(train) for t in (q, k, v))
    do = torch.randn_like(q) if train else None

    def call(stats=None):
        out = context_parallel_attention(qq, kk, vv, pat, layout=layout, strategy=strat, stats=stats,
                                         backend=args.kernel_backend, check=False)
        if train:
            out.backward(do)
        return out

    ms, ms_min = _time(call, args.reps, device)
    st = CPStats()
    call(st)  # bytes of one call
    sent, recv = st.bytes_sent, st.bytes_recv
    ran = st.strategy
    st = CPStats(sync=True)  # the compute / wait split (synchronised: exact split, less overlap)
    for _ in range(max(1, args.reps // 2)):
        call(st)
    n = max(1, args.reps // 2)
    comp = _max_all(st.compute_s / n * 1e3, device)
    wait = _max_all(st.wait_s / n * 1e3, device)
    W = dist.get_world_size()
    recv_max = _max_all(recv, device)
    return dict(ms=round(ms, 3), ms_min=round(ms_min, 3), strategy=ran, bytes_recv_max=int(recv_max),
                bytes_recv_mean=int(_sum_all(recv, device) / W), bytes_sent_max=int(_max_all(sent, device)),
                compute_ms=round(comp, 3), wait_ms=round(wait, 3))


def relative_to_dense_ring(rows: list[dict]) -> None:
    """Fill ``dense_ring_bytes_recv_max`` / ``bytes_vs_dense_ring`` from the measured dense ring row
    (pattern ``dense``, strategy ``ring``) of the same length and mode, when the run has one."""
    ref = {(r["seq_len"], r["mode"]): r["bytes_recv_max"] for r in rows
           if r.get("pattern") == "dense" and r.get("strategy") == "ring" and r.get("method") == "sparsattn"
           and r.get("bytes_recv_max") is not None}
    for r in rows:
        b = ref.get((r["seq_len"], r["mode"]))
        if b is not None:
            r["dense_ring_bytes_recv_max"] = b
        d = r.get("dense_ring_bytes_recv_max")
        if r.get("bytes_recv_max") is not None and d:
            r["bytes_vs_dense_ring"] = round(r["bytes_recv_max"] / d, 4)


def hidden_share(rows: list[dict]) -> None:
    """Fill ``hidden_share``: 1 - exposed wait / (bytes received at the measured link rate)."""
    for r in rows:
        bw, b, w = r.get("link_gbps"), r.get("bytes_recv_max"), r.get("wait_ms")
        if bw and b and w is not None and math.isfinite(bw) and bw > 0:
            comm_ms = b / (bw * 1e9) * 1e3
            r["hidden_share"] = round(max(0.0, min(1.0, 1 - w / comm_ms)), 3) if comm_ms > 0 else None


def plan_bytes(args) -> list[dict]:
    """Forward bytes received by the busiest rank, per strategy, from the plans alone (no process
    group, no tensors): for worlds ``args.worlds`` and the lengths / patterns / densities of ``args``."""
    from .._environment import environment

    rows = []
    date = environment()["date"]
    B, Hq, Hkv, D = args.batch, args.q_heads, args.kv_heads, args.head_dim
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    kv_row, q_row = 2 * B * Hkv * D * elem, 2 * B * Hq * D * elem
    for T in args.seq_lens:
        for kind, dens in [(pk, d) for pk in args.patterns for d in args.densities]:
            if (kind == "dense") != (dens >= 1.0):
                continue
            pat = make_pattern(kind, T, dens, args.block, Hkv, "cpu")
            for W in args.worlds:
                lay = make_layout(args.layout, T, W, args.block)
                dense = make_pattern("dense", T, 1.0, args.block, Hkv, "cpu")
                ref = max(build_plan(dense, lay, r, "shared").bytes_estimate("ring", kv_row, q_row) for r in range(W))
                plans = [build_plan(pat, lay, r, "shared") for r in range(W)]
                for strat in ("ring", "fetch", "ulysses"):
                    b = max(p.bytes_estimate(strat, kv_row, q_row, 4 * B * Hq) for p in plans)
                    rows.append(dict(date=date, world=W, seq_len=T, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                                     dtype=args.dtype, pattern=kind, target_density=dens,
                                     density=round(pat.density, 4), strategy=strat, layout=args.layout, mode="fwd",
                                     bytes_recv_max=b, dense_ring_bytes_recv_max=ref,
                                     bytes_vs_dense_ring=round(b / ref, 4) if ref else None, status="plan"))
                    if args.verbose:
                        print(rows[-1], flush=True)
    return rows


def parser() -> argparse.ArgumentParser:
    """Command-line options of scripts/cp_bench.py."""
    ap = argparse.ArgumentParser(description="sparse context-parallel attention benchmark (CSV)")
    ap.add_argument("--seq-lens", type=lambda s: [int(float(x)) for x in s.split(",")], default=[4096])
    ap.add_argument("--densities", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.1, 1.0])
    ap.add_argument("--patterns", type=lambda s: s.split(","), default=["local", "random", "dense"])
    ap.add_argument("--strategies", type=lambda s: s.split(","), default=["ring", "fetch", "ulysses"])
    ap.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    ap.add_argument("--layout", default="zigzag")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kernel-backend", default=None, choices=[None, "triton", "reference"])
    ap.add_argument("--torch-cp", action="store_true", help="also time torch's context_parallel SDPA (dense)")
    ap.add_argument("--check", action="store_true", help="compare outputs with single-device attention")
    ap.add_argument("--spawn", type=int, default=0, help="CPU smoke mode: start N gloo processes here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="cp_bench.csv")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--plan-only", action="store_true",
                    help="no run: forward bytes per strategy from the plans, for --worlds")
    ap.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    return ap


def _rank_main(rank: int, world: int, args, init: Optional[str]) -> None:
    import datetime

    from .._files import write_csv

    if init is not None:  # spawned gloo process
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args.timeout))
    try:
        rows = run(args)
        relative_to_dense_ring(rows)
        hidden_share(rows)
        if dist.get_rank() == 0:
            write_csv(rows, args.out, COLUMNS)
            print(f"wrote {len(rows)} rows to {args.out}", flush=True)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    """Entry point of scripts/cp_bench.py: torchrun (NCCL on CUDA, gloo on CPU) or ``--spawn N``."""
    import datetime
    import tempfile

    args = parser().parse_args(argv)
    if args.plan_only:
        from .._files import write_csv

        rows = plan_bytes(args)
        write_csv(rows, args.out, COLUMNS)
        print(f"wrote {len(rows)} rows to {args.out}")
        return
    if args.spawn:
        args.device = args.device or "cpu"
        fd, path = tempfile.mkstemp(prefix="cp_bench_")
        os.close(fd)
        os.unlink(path)
        import torch.multiprocessing as mp

        mp.spawn(_rank_main, args=(args.spawn, args, f"file://{path}"), nprocs=args.spawn, join=True)
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and args.device in (None, "cuda"):
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
        backend = "nccl"
    else:
        args.device = args.device or "cpu"
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout),
                            device_id=torch.device(args.device) if backend == "nccl" else None)
    _rank_main(dist.get_rank(), dist.get_world_size(), args, None)
