"""Sparse decode kernel: Triton (interpreted on the CPU) vs the torch reference vs dense attention."""
import math
import os

import pytest
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference  # noqa: E402
from sparsattn.kernels.sparse_decode import sparse_decode_attention  # noqa: E402
from sparsattn.kernels.sparse_decode.reference import paged_to_contiguous  # noqa: E402
from sparsattn.patterns import TokenPattern  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU) or CUDA")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def poison(monkeypatch):
    """Every floating tensor allocated with torch.empty starts as NaN, so unwritten outputs fail."""
    orig = torch.empty

    def empty(*a, **k):
        t = orig(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _pattern(B, H, T, P, kv_lens, counts_kind, gen):
    """Random sorted selections with different counts per batch: 0, full and random in between."""
    lists = []
    for b in range(B):
        units = -(-int(kv_lens[b]) // P)
        rows = []
        for h in range(H):
            if counts_kind[b] == "zero":
                n = 0
            elif counts_kind[b] == "full":
                n = units
            else:
                n = int(torch.randint(1, max(units, 1) + 1, (1,), generator=gen)) if units else 0
            rows.append(sorted(torch.randperm(units, generator=gen)[:n].tolist()))
        lists.append(rows)
    return TokenPattern.from_lists(lists, T, page_size=P)


def _close(a, b, tol):
    assert not torch.isnan(a).any(), "NaN in output"
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert err <= tol * max(1.0, b.float().abs().max().item()), err


CASES = [  # T, D, G (Hq/Hkv), dtype, page size, pattern heads ("kv" or "q" or "one")
    (1, 64, 1, torch.float32, 1, "kv"),
    (63, 80, 4, torch.float16, 1, "kv"),
    (200, 128, 8, torch.bfloat16, 16, "kv"),
    (1000, 64, 2, torch.float32, 16, "q"),
    (200, 80, 1, torch.bfloat16, 1, "one"),
    (1000, 128, 8, torch.float16, 1, "kv"),
    (63, 64, 4, torch.float32, 16, "one"),
    (200, 64, 2, torch.float32, 1, "q"),
]


@pytest.mark.parametrize("T,D,G,dtype,P,heads", CASES)
def test_kernel_matches_reference(T, D, G, dtype, P, heads, poison):
    gen = torch.Generator().manual_seed(T * 7 + D + G)
    B, Hkv = 3, 2
    Hq = Hkv * G
    q = torch.randn(B, Hq, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(DEV, dtype)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(DEV, dtype)
    kv_lens = torch.tensor([T, max(T // 3, 1), T])
    H = {"kv": Hkv, "q": Hq, "one": 1}[heads]
    pat = _pattern(B, H, T, P, kv_lens, ["full", "rand", "zero"], gen).to(DEV)
    kv_lens = kv_lens.to(DEV)
    for splits in ((None,) if T >= 1000 else (None, 3)):
        o, lse = sparse_decode_attention(q, k, v, pat, kv_lens=kv_lens, return_lse=True, backend="triton",
                                         num_splits=splits)
        ro, rlse = sparse_decode_attention(q, k, v, pat, kv_lens=kv_lens, return_lse=True, backend="reference")
        assert o.dtype == dtype and lse.dtype == torch.float32 and o.shape == (B, Hq, D)
        _close(o, ro, TOL[dtype])
        # batch 2 selects nothing: zeros and -inf
        assert (o[2] == 0).all() and torch.isneginf(lse[2]).all()
        fin = torch.isfinite(rlse)
        assert torch.equal(fin, torch.isfinite(lse))
        assert (lse[fin] - rlse[fin]).abs().max() <= 1e-3
    # batch 0 selects the whole cache: equals dense attention with the query as the last position
    ref, ref_lse = dense_reference(q[:1, :, None], k[:1], v[:1], causal=True)
    _close(o[:1], ref[:, :, 0], TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_pattern_none_with_kv_lens(dtype, poison):
    gen = torch.Generator().manual_seed(1)
    B, Hq, Hkv, T, D = 3, 8, 2, 300, 64
    q = torch.randn(B, Hq, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(DEV, dtype)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(DEV, dtype)
    kv_lens = torch.tensor([300, 1, 0], device=DEV)
    o, lse = sparse_decode_attention(q, k, v, None, kv_lens=kv_lens, return_lse=True, backend="triton")
    for b in range(2):
        L = int(kv_lens[b])
        ref, rl = dense_reference(q[b:b + 1, :, None], k[b:b + 1, :, :L], v[b:b + 1, :, :L])
        _close(o[b:b + 1], ref[:, :, 0], TOL[dtype])
        assert (lse[b] - rl[0, :, 0]).abs().max() < 1e-3
    assert (o[2] == 0).all() and torch.isneginf(lse[2]).all()


def test_log_weight_compensation_formula(poison):
    """RazorAttention's compensation token: o = (sum_kept e^s v + n e^s_c v_c) / (sum_kept e^s + n e^s_c)."""
    gen = torch.Generator().manual_seed(2)
    B, Hq, Hkv, T, D = 2, 4, 2, 50, 64
    q = torch.randn(B, Hq, D, generator=gen).to(DEV)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(DEV)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(DEV)
    sel = [[[0, 1, 30, 40, 49], [0, 2, 3, 48]], [[5, 10], [0, 1, 2, 3, 4, 5]]]
    pat = TokenPattern.from_lists(sel, T, device=DEV)
    n_drop = torch.tensor([[7.0, 3.0], [1.0, 12.0]], device=DEV)
    lw = torch.zeros(B, Hkv, pat.indices.shape[-1], device=DEV)
    lw[:, :, 1] = n_drop.log()  # the second selected entry of each row is a compensation token
    outs = {be: sparse_decode_attention(q, k, v, pat, log_weight=lw, backend=be, return_lse=True)
            for be in ("triton", "reference")}
    scale = 1 / math.sqrt(D)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            ids = sel[b][g]
            s = (k[b, g, ids].double() @ q[b, h].double()) * scale
            w = torch.ones(len(ids), dtype=torch.float64, device=DEV)
            w[1] = n_drop[b, g]
            e = w * torch.exp(s)
            want = (e[:, None] * v[b, g, ids].double()).sum(0) / e.sum()
            for be, (o, lse) in outs.items():
                assert torch.allclose(o[b, h].double(), want, atol=1e-5), be
                assert abs(float(lse[b, h]) - float(torch.log(e.sum()))) < 1e-4, be


@pytest.mark.parametrize("cps,dtype", [(16, torch.bfloat16), (1, torch.float32)])
def test_paged_layout_matches_contiguous(cps, dtype, poison):
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, max_pages = 2, 8, 2, 80, 13 if cps == 16 else 70
    T = max_pages * cps
    n_pages = B * max_pages + 3
    pages_k = torch.randn(n_pages, Hkv, cps, D, generator=gen).to(DEV, dtype)
    pages_v = torch.randn(n_pages, Hkv, cps, D, generator=gen).to(DEV, dtype)
    bt = torch.randperm(n_pages, generator=gen)[: B * max_pages].view(B, max_pages).to(DEV, torch.int32)
    kv_lens = torch.tensor([T, T - 5])
    q = torch.randn(B, Hq, D, generator=gen).to(DEV, dtype)
    kc, vc = paged_to_contiguous(pages_k, bt, T), paged_to_contiguous(pages_v, bt, T)
    pat = _pattern(B, Hkv, T, 4, kv_lens, ["rand", "rand"], gen).to(DEV)
    kv_lens = kv_lens.to(DEV)
    for p in (pat, None):
        o = sparse_decode_attention(q, pages_k, pages_v, p, kv_lens=kv_lens, block_table=bt, backend="triton")
        oc = sparse_decode_attention(q, kc, vc, p, kv_lens=kv_lens, backend="reference")
        orp = sparse_decode_attention(q, pages_k, pages_v, p, kv_lens=kv_lens, block_table=bt, backend="reference")
        _close(o, oc, TOL[dtype])
        _close(orp, oc, 1e-6)


def test_validation_errors():
    B, Hq, Hkv, T, D = 2, 4, 2, 40, 64
    q, k, v = torch.randn(B, Hq, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    kl = torch.tensor([40, 20])

    def pat(idx, cnt, P=1):
        return TokenPattern(torch.tensor(idx, dtype=torch.int32), torch.tensor(cnt, dtype=torch.int32), T, P)

    ok = pat([[[0, 5], [1, 2]], [[0, 19], [3, 4]]], [[2, 2], [2, 2]])
    sparse_decode_attention(q, k, v, ok, kv_lens=kl, backend="reference")
    with pytest.raises(ValueError, match="pattern.indices"):  # 25 >= kv_lens[1] = 20
        sparse_decode_attention(q, k, v, pat([[[0, 5], [1, 2]], [[0, 25], [3, 4]]], [[2, 2], [2, 2]]), kv_lens=kl)
    with pytest.raises(ValueError, match="pattern.indices"):  # unsorted
        sparse_decode_attention(q, k, v, pat([[[5, 0], [1, 2]], [[0, 1], [3, 4]]], [[2, 2], [2, 2]]), kv_lens=kl)
    with pytest.raises(ValueError, match="pattern.counts"):  # budget larger than the cache (pages)
        idx = [[list(range(3)), list(range(3))], [list(range(3)), list(range(3))]]
        sparse_decode_attention(q, k, v, pat(idx, [[3, 3], [3, 3]], P=16), kv_lens=torch.tensor([40, 20]))
    with pytest.raises(ValueError, match="pattern.counts"):  # negative budget
        sparse_decode_attention(q, k, v, pat([[[0, 5], [1, 2]], [[0, 1], [3, 4]]], [[-1, 2], [2, 2]]), kv_lens=kl)
    with pytest.raises(ValueError, match="kv_lens"):
        sparse_decode_attention(q, k, v, ok, kv_lens=torch.tensor([41, 3]))
    with pytest.raises(ValueError, match="pattern heads"):
        sparse_decode_attention(q, k, v, pat([[[0]] * 3] * 2, [[1] * 3] * 2))
    with pytest.raises(ValueError, match="pattern.kv_len"):
        sparse_decode_attention(q, k[:, :, :30], v[:, :, :30], ok)
    with pytest.raises(ValueError, match="k_cache.dtype"):
        sparse_decode_attention(q, k.half(), v.half(), ok)
    with pytest.raises(ValueError, match="log_weight"):
        sparse_decode_attention(q, k, v, None, log_weight=torch.zeros(B, Hkv, 2))
    # validate=False skips the O(n) checks (benchmarks) but cheap checks still run
    sparse_decode_attention(q, k, v, ok, kv_lens=kl, validate=False, backend="reference")


def test_decode_bench_smoke(tmp_path):
    """The GPU benchmark runs end to end on tiny CPU sizes and its outputs are correct."""
    from sparsattn.bench.decode import run_decode_bench

    out = tmp_path / "d.csv"
    rows = run_decode_bench(lengths=(80,), batches=(2,), budgets=(1 / 16,), hq=4, hkv=2, d=32, dtype=torch.float32,
                            device="cpu", out_csv=str(out), flex=False, reps=1)
    impls = {r["impl"] for r in rows}
    assert {"sdpa_dense", "sparse_dense", "sparse_tokens", "sparse_pages16", "quest+kernel",
            "double_sparsity+kernel"} <= impls
    assert all(r["ms"] is not None and r["ms"] > 0 for r in rows), [r["note"] for r in rows]
    assert all(r["max_err"] is None or r["max_err"] < 1e-4 for r in rows)
    assert out.read_text().startswith("impl,T,B")
    assert (tmp_path / "d.png").stat().st_size > 10_000  # the figure beside the CSV


def test_traces_under_torch_compile():
    """The Triton launch is a custom op with a fake implementation: torch.compile traces it (fullgraph)."""
    gen = torch.Generator().manual_seed(4)
    B, Hq, Hkv, T, D = 2, 4, 2, 40, 32
    q = torch.randn(B, Hq, D, generator=gen).to(DEV)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(DEV)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(DEV)
    pat = TokenPattern.from_lists([[[0, 3, 39], [1, 2]], [[5], [0, 7, 8, 9]]], T, device=DEV)

    def f(q, k, v):
        return sparse_decode_attention(q, k, v, pat, backend="triton", validate=False) * 2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    want = 2 * sparse_decode_attention(q, k, v, pat, backend="reference")
    _close(got, want, 1e-5)


@pytest.mark.parametrize("dtype,P", [(torch.float32, 1), (torch.bfloat16, 16)])
def test_fused_merge_matches_two_kernel_merge(dtype, P, poison):
    """The split-K merge fused into the launch (last-ticket program) equals the separate merge kernel
    and the reference, leaves its ticket counters at zero, and gives the same result when repeated
    (counters reused by the next call)."""
    from sparsattn.kernels.sparse_decode import triton as tri

    gen = torch.Generator().manual_seed(11)
    B, Hkv, G, T, D = 3, 2, 3, 301, 48
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(DEV, dtype)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(DEV, dtype)
    kv_lens = torch.tensor([T, 97, 5])
    pat = _pattern(B, Hkv, T, P, kv_lens, ["full", "rand", "rand"], gen).to(DEV)
    kl = kv_lens.to(DEV, torch.int32)
    ro, rlse = sparse_decode_attention(q, k, v, pat, kv_lens=kl, return_lse=True, backend="reference")
    kw = dict(scale=1 / math.sqrt(D), page_size=P, block_n=16, num_splits=5)
    outs = []
    for fused in (True, False, True):
        o, lse = tri.sparse_decode_triton(q, k, v, pat.indices, pat.counts, kl, fused_merge=fused, **kw)
        _close(o, ro, TOL[dtype])
        fin = torch.isfinite(rlse)
        assert torch.equal(fin, torch.isfinite(lse)) and (lse[fin] - rlse[fin]).abs().max() <= 1e-3
        outs.append(o)
    assert torch.equal(outs[0], outs[2])
    assert all(int(sem.abs().sum()) == 0 for sem, _ in tri._SEMS.values())


@pytest.mark.parametrize("heads,P,dtype", [(None, 1, torch.float32), ("kv", 1, torch.bfloat16), ("q", 16, torch.float32),
                                           ("one", 1, torch.float16)])
def test_per_kv_head_lengths(heads, P, dtype, poison):
    """kv_lens [B, Hkv]: each KV head reads only its own first kv_lens[b, h] slots (dense and
    pattern), kernel == reference == per-head dense attention; an index past a head's length is a
    clear error."""
    gen = torch.Generator().manual_seed(5)
    B, Hkv, G, T, D = 2, 3, 2, 150, 32
    Hq = Hkv * G
    q = torch.randn(B, Hq, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(DEV, dtype)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(DEV, dtype)
    lens = torch.tensor([[150, 7, 64], [0, 150, 33]])
    pat = None
    if heads is not None:
        H = {"kv": Hkv, "q": Hq, "one": 1}[heads]
        n = -(-int(lens.min().clamp_min(1)) // P) if heads == "one" else None
        rows = []
        for b in range(B):
            rb = []
            for h in range(H):
                L = int(lens[b].min()) if heads == "one" else int(lens[b, h // (H // Hkv)])
                units = -(-L // P)
                rb.append(sorted(torch.randperm(units, generator=gen)[: max(units // 2, min(units, 1))].tolist()))
            rows.append(rb)
        pat = TokenPattern.from_lists(rows, T, page_size=P).to(DEV)
        del n
    kl = lens.to(DEV, torch.int32)
    o, lse = sparse_decode_attention(q, k, v, pat, kv_lens=kl, backend="triton", return_lse=True)
    ro, rlse = sparse_decode_attention(q, k, v, pat, kv_lens=kl, backend="reference", return_lse=True)
    _close(o, ro, TOL[dtype])
    assert torch.equal(torch.isfinite(lse), torch.isfinite(rlse))
    if pat is None:  # per-head dense attention over the first lens[b, h] slots
        for b in range(B):
            for h in range(Hq):
                L = int(lens[b, h // G])
                if L == 0:
                    assert (o[b, h] == 0).all() and torch.isneginf(lse[b, h])
                    continue
                s = (k[b, h // G, :L].float() @ q[b, h].float()) / math.sqrt(D)
                want = s.softmax(0) @ v[b, h // G, :L].float()
                _close(o[b, h], want, TOL[dtype])
    else:
        bad = TokenPattern.from_lists([[[0, 10]] * Hkv, [[]] + [[1]] * (Hkv - 1)], T, page_size=1).to(DEV)
        with pytest.raises(ValueError, match="pattern.indices"):  # slot 10 of head (0, 1), which holds 7
            sparse_decode_attention(q, k, v, bad, kv_lens=kl)
    with pytest.raises(ValueError, match="kv_lens"):
        sparse_decode_attention(q, k, v, None, kv_lens=kl[:, :2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_capture_and_replay():
    """The split-K launch (fused merge, cached per-stream buffers outside captures, fresh ones inside)
    can be captured in a CUDA graph; replays follow new inputs written into the captured tensors."""
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, T, D = 2, 2, 4, 3000, 64
    q = torch.randn(B, Hkv * G, D, generator=gen).cuda().half()
    k = torch.randn(B, Hkv, T, D, generator=gen).cuda().half()
    v = torch.randn(B, Hkv, T, D, generator=gen).cuda().half()
    pat = _pattern(B, Hkv, T, 1, torch.tensor([T, T]), ["full", "rand"], gen).to("cuda")
    kl = torch.tensor([T, T], dtype=torch.int32, device="cuda")
    f = lambda: sparse_decode_attention(q, k, v, pat, kv_lens=kl, validate=False, num_splits=6)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = f()
    for _ in range(3):
        q.copy_(torch.randn(q.shape, generator=gen).half())
        g.replay()
        torch.cuda.synchronize()
        _close(out, sparse_decode_attention(q, k, v, pat, kv_lens=kl, backend="reference"), TOL[torch.float16])
