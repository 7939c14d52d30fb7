"""Cases run inside the spawned ranks (see _harness.py): each rank compares its shard of the
context-parallel output, lse and gradients with single-process ``sparsattn.attention`` on the whole
sequence, and returns a list of failures (empty = all equal) plus what it measured."""
from __future__ import annotations

import time

import torch


def _patterns(T: int, heads: int):
    from sparsattn import patterns as P

    g = torch.Generator().manual_seed(7)
    # per batch entry and per KV head: random blocks with element tiles, some rows empty
    rand = P.from_dense_mask(torch.rand(2, heads, T, T, generator=g) < 0.08, block_size=16, causal=True)
    return {
        "causal": P.causal(T, block_q=16, block_k=32),  # block_q != block_k
        "random_heads": rand,
        "noncausal_window": P.sliding_window(T, 50, causal=False, block_q=16),
    }


def _close(name, a, b, tol, fails):
    a, b = a.float(), b.float()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    if torch.isnan(a).any():
        fails.append(f"{name}: NaN")
        return
    err = torch.where(both_inf, torch.zeros_like(a), (a - b).abs()).max().item() if a.numel() else 0.0
    if not err <= tol:
        fails.append(f"{name}: max error {err:.3g} > {tol}")


def compare(rank, world, T, B, Hq, Hkv, D, pname, pattern, layouts, strategies, backend="reference", tol=2e-5):
    """Run every layout x strategy on one pattern; return failure strings."""
    from sparsattn import attention
    from sparsattn.distributed import CPStats, context_parallel_attention, make_layout, shard

    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    do = torch.randn(B, Hq, T, D, generator=g)
    qf, kf, vf = (t.clone().requires_grad_(True) for t in (q, k, v))
    o, lse = attention(qf, kf, vf, pattern, return_lse=True, backend="reference")
    (o * do).sum().backward()
    fails = []
    for lay in layouts:
        L = make_layout(lay, T, world, max(pattern.block_q, pattern.block_k))
        for strat in strategies:
            tag = f"{pname}/{lay}/{strat}/{backend}/W{world}/r{rank}"
            ql, kl, vl = (shard(t, L, rank).clone().requires_grad_(True) for t in (q, k, v))
            st = CPStats()
            ol, ll = context_parallel_attention(ql, kl, vl, pattern, layout=lay, strategy=strat, return_lse=True,
                                                backend=backend, stats=st, timeout_s=20)
            (ol * shard(do, L, rank)).sum().backward()
            _close(f"{tag} out", ol, shard(o, L, rank), tol, fails)
            _close(f"{tag} lse", ll, shard(lse, L, rank), tol, fails)
            _close(f"{tag} dq", ql.grad, shard(qf.grad, L, rank), tol, fails)
            _close(f"{tag} dk", kl.grad, shard(kf.grad, L, rank), tol, fails)
            _close(f"{tag} dv", vl.grad, shard(vf.grad, L, rank), tol, fails)
            if st.strategy != (strat if strat != "auto" else st.strategy):
                fails.append(f"{tag}: ran {st.strategy}")
    return fails


def main_cases(rank, world):
    """The equivalence grid for ``world`` ranks plus the mismatched-pattern check."""
    from sparsattn import patterns as P
    from sparsattn.distributed import context_parallel_attention, make_layout, shard

    t0 = time.perf_counter()
    fails = []
    T, B, D = 300, 2, 16  # 300: not a multiple of the shard unit -> uneven shards
    Hq, Hkv = (4, 2) if world == 2 else (8, 4)  # GQA; heads divide the ranks for Ulysses
    pats = _patterns(T, Hkv)
    both = ("zigzag", "contiguous")
    grid = [("causal", both, ("ring", "fetch", "ulysses", "auto")),
            ("random_heads", both, ("ring", "fetch", "ulysses"))]
    if world == 2:
        grid.append(("noncausal_window", both, ("ring", "fetch", "ulysses")))
    for name, layouts, strategies in grid:
        fails += compare(rank, world, T, B, Hq, Hkv, D, name, pats[name], layouts, strategies)
    # empty shards: 80 tokens in units of 32 -> 3 units over 4 ranks (and 8 zigzag chunks)
    if world == 4:
        Te = 80
        pe = {"causal": P.causal(Te, block_q=16, block_k=32), "dense": P.dense(Te, block_q=32)}
        for name, p in pe.items():
            fails += compare(rank, world, Te, 1, 4, 4, 8, f"empty_{name}", p, ("zigzag", "contiguous"),
                             ("ring", "fetch", "ulysses"))
    if world == 2:  # one small case through the Triton kernels (interpreter on the CPU)
        import os

        if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
            fails += triton_case(rank, world)["fails"]
        else:
            fails.append("triton case not run: TRITON_INTERPRET=1 is not set")
    if world == 2:
        fails += bench_smoke(rank)
    # a pattern that differs on one rank: every rank raises ValueError (no hang)
    L = make_layout("zigzag", T, world, 32)
    q = torch.randn(1, Hq, L.rank_len(rank), D)
    k = torch.randn(1, Hkv, L.rank_len(rank), D)
    bad = pats["causal"] if rank != world - 1 else P.sliding_window(T, 64, block_q=16, block_k=32)
    try:
        context_parallel_attention(q, k, k, bad, layout=L, backend="reference", timeout_s=20)
        fails.append(f"r{rank}: mismatched pattern did not raise")
    except ValueError as e:
        if "differs across ranks" not in str(e):
            fails.append(f"r{rank}: mismatched pattern raised {e}")
    return {"fails": fails, "seconds": time.perf_counter() - t0}


def bench_smoke(rank):
    """The benchmark's rows on this process group: every configuration runs, outputs equal the
    single-device result, and the sparse fetch of a local pattern moves less than the dense ring."""
    from sparsattn.distributed import bench

    args = bench.parser().parse_args(["--seq-lens", "512", "--densities", "0.1,1.0", "--patterns", "local,dense",
                                      "--strategies", "ring,fetch", "--modes", "fwd", "--q-heads", "2",
                                      "--kv-heads", "1", "--head-dim", "16", "--block", "32", "--dtype", "fp32",
                                      "--reps", "1", "--kernel-backend", "reference", "--check", "--device", "cpu"])
    rows = bench.run(args)
    bench.relative_to_dense_ring(rows)
    fails = [f"bench r{rank}: {r['pattern']}/{r['strategy']}/{r['mode']}: {r['status']}" for r in rows if r["status"] != "ok"]
    fails += [f"bench r{rank}: max_err {r['max_err']}" for r in rows if r.get("max_err") is not None and r["max_err"] > 1e-5]
    from sparsattn.distributed.plan import build_plan

    for r in rows:  # measured forward bytes = the plan's estimate (the busiest rank)
        pat = bench.make_pattern(r["pattern"], 512, r["target_density"], 32, 1, "cpu")
        lay = bench.make_layout("zigzag", 512, 2, 32)
        est = max(build_plan(pat, lay, j, "shared").bytes_estimate(r["strategy"], 2 * 16 * 4, 2 * 2 * 16 * 4)
                  for j in range(2))
        if r["bytes_recv_max"] != est:
            fails.append(f"bench r{rank}: {r['pattern']}/{r['strategy']}: measured {r['bytes_recv_max']} != plan {est}")
    local_fetch = [r for r in rows if r["pattern"] == "local" and r["strategy"] == "fetch"]
    if len(local_fetch) != 1 or not all(r["bytes_vs_dense_ring"] < 0.5 for r in local_fetch):
        fails.append(f"bench r{rank}: local fetch bytes vs dense ring: {[r.get('bytes_vs_dense_ring') for r in local_fetch]}")
    return fails


def triton_case(rank, world):
    """One small case through the Triton kernels (TRITON_INTERPRET=1 on the CPU)."""
    from sparsattn import patterns as P

    p = P.causal(96, block_q=16, block_k=16)
    fails = compare(rank, world, 96, 1, 4, 2, 16, "causal", p, ("zigzag",), ("fetch", "ulysses"),
                    backend="triton", tol=2e-4) if world == 2 else []
    return {"fails": fails}


def stalled_rank(rank, world, mode):
    """Rank ``world - 1`` fails (``mode="dead"``: exits; ``"stalled"``: never calls); the others
    must raise within their timeout. Returns the seconds until the error."""
    import os

    from sparsattn import patterns as P
    from sparsattn.distributed import context_parallel_attention, make_layout

    T = 128
    p = P.causal(T, block_q=16)
    L = make_layout("zigzag", T, world, 16)
    if rank == world - 1:
        if mode == "dead":
            os._exit(3)
        time.sleep(6)
        return {"slept": True}
    q = torch.randn(1, 2, L.rank_len(rank), 16)
    t0 = time.perf_counter()
    try:
        context_parallel_attention(q, q, q, p, layout=L, strategy="ring", backend="reference", timeout_s=3)
    except (RuntimeError, ValueError) as e:
        return {"raised": type(e).__name__, "seconds": time.perf_counter() - t0, "msg": str(e)[:200]}
    return {"raised": None, "seconds": time.perf_counter() - t0}
