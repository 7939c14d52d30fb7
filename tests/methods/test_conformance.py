"""Conformance of every registered prefill method (parametrized over the registry alone; the decode
methods' in ``test_decode_conformance.py``).

The tests read the presets each method declares (``sparsattn.methods.base``):

* ``small_config()``: the configuration for these small shapes (inputs have T = 200..600 tokens,
  4 query heads, 2 or 4 KV heads, head_dim 16..32);
* ``full_config(q_len)``: a configuration that keeps every causal pair; the "full budget equals
  exact attention" test is skipped for methods whose preset is None.

Methods whose ``needs`` is non-empty (calibration) are fitted on the given tensors (as layer 0) by
the test-only ``tests/methods/_fits.py``; with ``full=True`` a fit that keeps every causal pair, or
None. Calibrated methods without a test fit are skipped (with the reason).

``select`` is called with ``SelectContext(layer=0, causal=True, extras={"v": v})``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import sparsattn
from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.methods import get_method, list_methods, method_class
from sparsattn.methods.base import SelectContext
from sparsattn.patterns import BlockPattern

from _fits import example_fit  # tests/methods is on sys.path (pytest rootdir-relative import)

METHODS = list_methods("prefill")
SHAPES = [  # (B, Hq, Hkv, T, D)
    (1, 4, 2, 457, 32),
    (2, 4, 4, 200, 16),
]


def _inputs(B, Hq, Hkv, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * 1.5
    k = torch.randn(B, Hkv, T, D, generator=g) * 1.5
    v = torch.randn(B, Hkv, T, D, generator=g)
    return q, k, v


def _instance(name, q, k, v, full=False):
    cls = method_class(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls.needs:
            try:
                inst = example_fit(cls, q, k, v, full=full)
            except LookupError as e:
                pytest.skip(str(e))
            if inst is None:
                pytest.skip(f"{name}: the test fit gives no full-budget fit")
            return inst
        if full:
            cfg = cls.full_config(q.shape[2])
            if cfg is None:
                pytest.skip(f"{name} declares no full_config(q_len) preset")
            return get_method(name, **cfg)
        return get_method(name, **cls.small_config())


def _select(inst, q, k, v):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inst.select(q, k, SelectContext(layer=0, causal=True, extras={"v": v}))


def _dense_mask(p: BlockPattern, Hq: int) -> torch.Tensor:
    m = p.to_dense_mask()
    if m.shape[1] not in (1, Hq):
        m = m.repeat_interleave(Hq // m.shape[1], 1)
    return m


def test_every_method_module_registers_a_method():
    """A method file that stopped registering its class drops out of every registry-driven test
    silently: each public module of ``sparsattn/methods`` must register at least one class."""
    import importlib
    import pkgutil

    import sparsattn.methods as pkg

    registered = {method_class(n).__module__ for n in list_methods()}
    modules = [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
               if not m.name.startswith("_") and m.name != "base"]
    for mod in modules:
        importlib.import_module(mod)
    missing = sorted(set(modules) - registered)
    assert not missing, f"method modules registering no method: {missing}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", METHODS)
def test_pattern_invariants_and_kernel(name, shape):
    B, Hq, Hkv, T, D = shape
    q, k, v = _inputs(*shape)
    inst = _instance(name, q, k, v)
    p = _select(inst, q, k, v)
    if not isinstance(p, BlockPattern):
        pytest.skip(f"{name} returns {type(p).__name__}, not a mask pattern")
    p.validate()
    for t in (p.kv_num_blocks, p.kv_indices, p.full_kv_num_blocks, p.full_kv_indices):
        assert t.dtype == torch.int32
    if p.columns is not None:
        assert p.columns.indices.dtype == torch.int32 and p.columns.counts.dtype == torch.int32
    assert (p.q_len, p.kv_len) == (T, T)
    assert p.causal
    assert p.batch in (1, B)
    assert p.heads in (1, Hkv, Hq), f"pattern heads {p.heads} not in (1, {Hkv}, {Hq})"
    mask = _dense_mask(p, Hq)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert not (mask & ~causal).any(), "pattern keeps a pair above the diagonal"
    assert mask.diagonal(dim1=-2, dim2=-1).all(), "some query does not attend to itself"
    assert 0 < p.density <= 1 + 1e-9
    # the kernel computes exactly the pattern's mask
    out = sparsattn.attention(q, k, v, p, backend="reference")
    ref, _ = dense_reference(q, k, v, mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    # deterministic
    p2 = _select(inst, q, k, v)
    assert torch.equal(_dense_mask(p2, Hq), mask)


@pytest.mark.parametrize("name", METHODS)
def test_full_budget_is_exact_attention(name):
    shape = (1, 4, 2, 333, 32)
    q, k, v = _inputs(*shape, seed=1)
    inst = _instance(name, q, k, v, full=True)
    p = _select(inst, q, k, v)
    if not isinstance(p, BlockPattern):
        pytest.skip(f"{name} returns {type(p).__name__}, not a mask pattern")
    assert abs(p.density - 1.0) < 1e-9
    out = sparsattn.attention(q, k, v, p, backend="reference")
    ref, _ = dense_reference(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list_methods())
def test_bad_hyper_parameter_names_field(name):
    cls = method_class(name)
    import dataclasses

    fields = [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    checked = 0
    for f in fields:
        if f.type in ("int", int) or isinstance(f.default, int) and not isinstance(f.default, bool):
            with pytest.raises(ValueError, match=f.name):
                cls(**{f.name: -7})
            checked += 1
    if not checked:
        pytest.skip(f"{name} has no int hyper-parameter")


def test_a_calibrated_method_without_a_test_fit_is_fitted_by_its_presets(monkeypatch):
    """A new calibrated method needs no entry in tests/methods/_fits.py when it declares a preset:
    SeerAttention with its test fit removed runs on its ``random_calibration`` gate."""
    import _fits

    monkeypatch.delitem(_fits.FITS, "seer_attention")
    q, k, v = _inputs(1, 4, 2, 200, 32)
    inst = _fits.example_fit(method_class("seer_attention"), q, k, v)
    assert inst.is_fitted
    p = _select(inst, q, k, v)
    p.validate()
    assert 0 < p.density <= 1
    assert _fits.example_fit(method_class("seer_attention"), q, k, v, full=True) is None  # no full guarantee
