"""The flex backend on the CPU (issue 16, "faster than dense on a CPU too"): same outputs as the
reference on small odd shapes, the backend table's CPU rules and refusals, one compiled run (slow).

The equality tests run FlexAttention *uncompiled* (the same BlockMask, mask_mod and score_mod; the
eager path computes them exactly), since a CPU compile takes tens of seconds on 2 cores; the
``slow`` test compiles once.
"""
from __future__ import annotations

import pytest
import torch

import sparsattn
from sparsattn import patterns
from sparsattn.kernels import backends
from sparsattn.kernels.block_sparse import flex
from sparsattn.kernels.block_sparse.reference import block_sparse_reference


@pytest.fixture
def eager_flex(monkeypatch):
    """flex_block_sparse through uncompiled flex_attention (fast to start; same semantics)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setitem(flex._COMPILED, "fn", flex_attention)
    monkeypatch.setattr(flex, "_CPU_SHAPES", set())  # these calls compile nothing
    monkeypatch.setattr(flex, "CPU_PAD_TO", 128)  # causal inputs still padded (odd lengths), less eager work
    return flex_attention


def _qkv(B, Hq, Hkv, Tq, Tk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Tq, D, generator=g), torch.randn(B, Hkv, Tk, D, generator=g),
            torch.randn(B, Hkv, Tk, D, generator=g))


def _random_tiles(B, H, T, block, seed):
    """A causal pattern from a random element mask (tiles on partial blocks), every row keeps its diagonal."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, H, T, T, generator=g) < 0.3
    m = (m | torch.eye(T, dtype=torch.bool)) & torch.ones(T, T, dtype=torch.bool).tril()
    return patterns.from_dense_mask(m, block_size=block, causal=True)


CASES = [
    # (name, B, Hq, Hkv, Tq, Tk, D, pattern builder)
    ("causal_odd", 1, 4, 2, 100, 100, 24, lambda: patterns.causal(100, block_q=16)),
    ("sink_local_tiles", 2, 4, 2, 133, 133, 16, lambda: patterns.sink_local(133, 5, 21, block_q=32)),
    ("random_tiles_per_kv_head", 1, 4, 2, 77, 77, 32, lambda: _random_tiles(1, 2, 77, 16, 3)),
    ("random_tiles_per_q_head", 2, 4, 1, 64, 64, 8, lambda: _random_tiles(2, 4, 64, 16, 4)),
    ("chunk_bottom_right", 1, 2, 2, 37, 100, 16, lambda: patterns.causal(37, 100, block_q=16)),
    ("noncausal_window", 1, 2, 1, 90, 90, 16,
     lambda: patterns.sliding_window(90, 20, causal=False, block_q=16)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flex_cpu_equals_reference_on_odd_shapes(case, eager_flex):
    _, B, Hq, Hkv, Tq, Tk, D, build = case
    p = build()
    q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D)
    ref, _ = block_sparse_reference(q, k, v, p)
    out, lse = flex.flex_block_sparse(q, k, v, p, need_lse=False)
    assert lse is None  # the CPU kernel returns no lse
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    # through the public API, asked for by name
    out2 = sparsattn.attention(q, k, v, p, backend="flex")
    torch.testing.assert_close(out2, ref, atol=2e-5, rtol=2e-5)


def test_flex_cpu_softcap_and_empty_rows(eager_flex):
    """softcap as a score_mod equals the reference's; rows without keys give zeros (never NaN)."""
    q, k, v = _qkv(1, 4, 2, 70, 70, 16, seed=5)
    q = q * 4  # large scores, so the cap matters
    keep = torch.ones(70, 70, dtype=torch.bool).tril()
    keep[10:20] = False  # query rows 10..19 have no key
    p = patterns.from_dense_mask(keep[None, None], block_size=16, causal=True)
    ref, _ = block_sparse_reference(q, k, v, p, softcap=5.0)
    plain, _ = block_sparse_reference(q, k, v, p)
    out, _ = flex.flex_block_sparse(q, k, v, p, softcap=5.0, need_lse=False)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert (out[:, :, 10:20] == 0).all() and not torch.isnan(out).any()
    assert (out - plain).abs().max() > 1e-2  # the cap changed the result


def test_sinks_from_the_lse_equal_the_reference(eager_flex):
    """The CUDA flex path's sinks (from Flex's lse): checked here with eager Flex, which returns the lse."""
    q, k, v = _qkv(1, 4, 2, 70, 70, 16, seed=6)
    keep = torch.ones(70, 70, dtype=torch.bool).tril()
    keep[5:9] = False  # rows without a key: zeros, lse = sink
    p = patterns.from_dense_mask(keep[None, None], block_size=16, causal=True)
    sinks = torch.tensor([0.5, -1.0, 2.0, float("-inf")])
    ref, ref_lse = block_sparse_reference(q, k, v, p, sinks=sinks)
    out, lse = eager_flex(q, k, v, block_mask=flex.block_mask(p, 4), enable_gqa=True, return_lse=True)
    out, lse = flex.apply_sinks(out, lse.float(), sinks)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_flex_cpu_refusals_and_automatic_rule(monkeypatch):
    monkeypatch.setattr(flex, "_CPU_SHAPES", set())
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU order without the interpreter: flex, reference
    q, k, v = _qkv(1, 2, 1, flex.CPU_MIN_Q_LEN, flex.CPU_MIN_Q_LEN, 16)
    p = patterns.sink_local(q.shape[2], 16, 256, block_q=64)
    has_cxx = backends._cpp_compiler() is not None
    ok, why = backends.can_run("block_sparse", "flex", q, pattern=p)
    assert ok == has_cxx, why
    for extra, words in (({"need_lse": True}, "lse"), ({"sinks": torch.zeros(2)}, "sinks"),
                         ({"varlen": True}, "per-sequence")):
        ok, why = backends.can_run("block_sparse", "flex", q, pattern=p, **extra)
        assert not ok and words in why
    ok, why = backends.can_run("block_sparse", "flex", q.bfloat16(), pattern=p)
    assert not ok and "float32" in why
    with torch.enable_grad():
        ok, why = backends.can_run("block_sparse", "flex", q.clone().requires_grad_(), pattern=p)
    assert not ok and "inference" in why
    with pytest.raises(ValueError, match="backend: 'flex' cannot run.*lse"):
        sparsattn.attention(q, k, v, p, backend="flex", return_lse=True)
    if not has_cxx:
        pytest.skip("no C++ compiler: the CPU flex path cannot be chosen here")
    # automatic: flex from CPU_MIN_Q_LEN query tokens, the reference below and whenever the lse is needed
    assert sparsattn.choose_backend(q, p) == "flex"
    assert sparsattn.choose_backend(q, p, need_lse=True) == "reference"
    short = patterns.sink_local(flex.CPU_MIN_Q_LEN - 64, 16, 256, block_q=64)
    assert sparsattn.choose_backend(q[:, :, :-64], short) == "reference"
    ok, why = backends.flex_cpu_auto(q[:, :, :-64], pattern=short)
    assert not ok and str(flex.CPU_MIN_Q_LEN) in why
    # explicitly asked for, any length runs
    assert sparsattn.choose_backend(q[:, :, :-64], short, backend="flex") == "flex"


def test_flex_cpu_shape_budget(monkeypatch):
    """Past CPU_MAX_SHAPES compiled shapes in a process, flex is refused (never the unfused path)."""
    if backends._cpp_compiler() is None:
        pytest.skip("no C++ compiler")
    q = torch.zeros(1, 1, 64, 16)
    monkeypatch.setattr(flex, "_CPU_SHAPES", {("shape", i) for i in range(flex.CPU_MAX_SHAPES)})
    ok, why = backends.can_run("block_sparse", "flex", q, pattern=patterns.causal(64, block_q=16))
    assert not ok and "compiled" in why


def test_block_mask_is_cached_and_shape_stable():
    """One BlockMask per (pattern, heads); tile banks padded to a power of two (fewer recompiles)."""
    p = patterns.sink_local(200, 5, 40, block_q=32)
    assert flex.block_mask(p, 4) is flex.block_mask(p, 4)
    n = p.mask_bank.shape[0] + 2
    assert flex._bank_size(p) >= max(n, flex.MIN_BANK) and flex._bank_size(p) & (flex._bank_size(p) - 1) == 0
    bm = flex.block_mask(p, 4)
    assert tuple(bm.kv_num_blocks.shape) == (1, 4, p.n_q_blocks)
    assert bm.kv_indices.shape[-1] == p.n_kv_blocks
    # causal inputs padded to CPU_PAD_TO tokens on the CPU: lengths 1000 and 1024 share a compiled shape
    q = torch.zeros(1, 4, 1000, 16)
    k = torch.zeros(1, 2, 1000, 16)
    p1, p2 = patterns.causal(1000, block_q=64), patterns.causal(1024, block_q=64)
    assert flex.cpu_pad(p1) == 24 and flex.cpu_pad(p2) == 0
    assert flex.cpu_shape_key(q, k, p1, False) == flex.cpu_shape_key(torch.zeros(1, 4, 1024, 16),
                                                                     torch.zeros(1, 2, 1024, 16), p2, False)
    assert flex.cpu_pad(patterns.sliding_window(1000, 20, causal=False, block_q=64)) == 0
    bm = flex.block_mask(p1, 4, 24)
    assert tuple(bm.kv_num_blocks.shape) == (1, 4, 16) and bm.seq_lengths == (1024, 1024)
    assert int(bm.kv_num_blocks[0, 0, -1]) + int(bm.full_kv_num_blocks[0, 0, -1]) > 0


@pytest.mark.slow
def test_compiled_flex_cpu_equals_reference():
    """One real torch.compile on the CPU (tens of seconds on 2 cores)."""
    if backends._cpp_compiler() is None:
        pytest.skip("no C++ compiler")
    T = 250  # padded to CPU_PAD_TO on the CPU: appended rows/keys must not change a real row
    q, k, v = _qkv(1, 4, 2, T, T, 32, seed=9)
    keep = patterns.sink_local(T, 16, 48, block_q=64).to_dense_mask()[0, 0]
    keep[100:110] = False  # rows without a key: zeros, never NaN
    p = patterns.from_dense_mask(keep[None, None], block_size=64, causal=True)
    ref, _ = block_sparse_reference(q, k, v, p)
    with torch.no_grad():
        out = sparsattn.attention(q, k, v, p, backend="flex")
    assert not torch.isnan(out).any() and (out[:, :, 100:110] == 0).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_cpu_compile_failure_falls_back_to_the_reference(monkeypatch, caplog):
    """If Inductor cannot build the CPU kernel, the call is computed by the reference, a WARNING says
    why (once), and the table refuses flex on the CPU for the rest of the process."""
    import logging

    def broken(*a, **kw):
        raise RuntimeError("C++ compile error: Python.h: No such file or directory")

    monkeypatch.setitem(flex._COMPILED, "fn", broken)
    monkeypatch.setattr(flex, "_CPU_SHAPES", set())
    monkeypatch.setattr(flex, "_CPU_BROKEN", {})
    q, k, v = _qkv(1, 4, 2, 100, 100, 16)
    p = patterns.sink_local(100, 5, 21, block_q=32)
    with caplog.at_level(logging.WARNING, logger="sparsattn"):
        out = sparsattn.attention(q, k, v, p, backend="flex")
        with pytest.raises(ValueError, match="compiling FlexAttention for the CPU failed"):
            sparsattn.attention(q, k, v, p, backend="flex")  # known broken now: asked for, refused with why
    torch.testing.assert_close(out, block_sparse_reference(q, k, v, p)[0])
    assert sum("Python.h" in r.getMessage() for r in caplog.records) == 1
    ok, why = backends.can_run("block_sparse", "flex", q, pattern=p)
    assert not ok and "compiling FlexAttention for the CPU failed" in why
