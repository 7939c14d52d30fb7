"""Conformance of every registered decode method, parametrized over ``list_methods("decode")`` alone.

Each method is built from its own preset (``budget_config(budget, ctx)``; a method without one is
skipped with the reason). A method that needs a calibration is fitted through its
``calibrate_from_qk`` preset on random q/k (skipped with the reason when it has none). One decode
step runs on a ragged batch (``kv_lens`` 301 and 230 of a 301-slot cache) through 4 layers that
share ``ctx.state`` (cross-layer methods select on earlier layers; a second step when the first was
a full-attention step by design, ``ctx.full_step``); on the last layer:

* the pattern is a ``TokenPattern`` that validates (int32, sorted, in range), selects only valid
  slots of each sequence, and keeps at most the budget (rounded up to its page size) per row;
* the decode kernel on that pattern equals dense attention restricted to the pattern's tokens;
* with a budget covering the cache, the output equals dense attention over the valid slots.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.kernels.sparse_decode import sparse_decode_attention
from sparsattn.methods import list_methods, method_class
from sparsattn.methods.base import PresetContext, SelectContext
from sparsattn.patterns import TokenPattern

METHODS = list_methods("decode")
B, HQ, HKV, T, D, LAYERS = 2, 4, 2, 301, 32, 4
KV_LENS = (301, 230)


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, D, generator=g)
    k = torch.randn(B, HKV, T, D, generator=g)
    v = torch.randn(B, HKV, T, D, generator=g)
    return q, k, v, torch.tensor(KV_LENS, dtype=torch.int32)


def _method(name, budget):
    cls = method_class(name)
    cfg = cls.budget_config(budget, PresetContext(n_layers=LAYERS, n_heads=HQ, group_size=HQ // HKV))
    if cfg is None:
        pytest.skip(f"{name} declares no budget_config preset")
    cfg = dict(cfg)
    if cls.needs:
        g = torch.Generator().manual_seed(1)
        qs = [torch.randn(1, HQ, 64, D, generator=g) for _ in range(LAYERS)]
        ks = [torch.randn(1, HKV, 64, D, generator=g) for _ in range(LAYERS)]
        fitted = cls.calibrate_from_qk(qs, ks, cfg)
        if fitted is None:
            pytest.skip(f"{name} needs {cls.needs} and has no calibrate_from_qk preset")
        cfg.update(fitted)
    try:
        return cls(**cfg)
    except ImportError as e:  # an optional dependency (e.g. an ANN library)
        pytest.skip(f"{name}: {e}")


def _last_layer_pattern(m, q, k, v, kv_lens):
    """The last layer's pattern of one decode step (a second step when the method reports that the
    first was a full-attention step by design, ``ctx.full_step``, e.g. Recycled Attention)."""
    state: dict = {}
    p = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _step in range(2):
            for layer in range(LAYERS):
                ctx = SelectContext(layer=layer, phase="decode", kv_lens=kv_lens, state=state, v=v)
                try:
                    p = m.select(q, k, ctx)
                except ImportError as e:
                    pytest.skip(str(e))
            if not ctx.full_step:
                break
    return p


def _dense_on(q, k, v, kv_lens, token_mask=None):
    out = []
    for b in range(q.shape[0]):
        L = int(kv_lens[b])
        mask = None
        if token_mask is not None:
            mask = token_mask[b:b + 1, :, None, :L]
            if mask.shape[1] != q.shape[1]:
                mask = mask.repeat_interleave(q.shape[1] // mask.shape[1], 1)
        ref, _ = dense_reference(q[b:b + 1, :, None], k[b:b + 1, :, :L], v[b:b + 1, :, :L], mask=mask)
        out.append(ref[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize("name", METHODS)
def test_decode_pattern_invariants_budget_and_kernel(name):
    budget = 48
    q, k, v, kv_lens = _case()
    m = _method(name, budget)
    p = _last_layer_pattern(m, q, k, v, kv_lens)
    assert isinstance(p, TokenPattern), f"{name}: select returned {type(p).__name__}"
    p.validate()
    assert p.indices.dtype == torch.int32 and p.counts.dtype == torch.int32
    assert p.batch in (1, B) and p.heads in (1, HKV, HQ) and p.kv_len == T
    tok = p.to_token_mask()  # [B, H, T]
    for b, L in enumerate(KV_LENS):
        assert not tok[b if p.batch > 1 else 0, :, L:].any(), f"{name}: selects slots past kv_lens[{b}]={L}"
    kept = tok.sum(-1)
    assert (kept > 0).all()
    assert int(kept.max()) <= budget + p.page_size - 1, f"{name}: {int(kept.max())} tokens for a budget of {budget}"
    out = sparse_decode_attention(q, k, v, p, kv_lens=kv_lens, backend="reference")
    assert torch.isfinite(out).all()
    ref = _dense_on(q, k, v, kv_lens, tok.expand(B, -1, -1))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_decode_full_budget_is_exact_attention(name):
    q, k, v, kv_lens = _case(seed=2)
    m = _method(name, 2 * (T + 1))  # as decode_quality's "full" budget
    p = _last_layer_pattern(m, q, k, v, kv_lens)
    out = sparse_decode_attention(q, k, v, p, kv_lens=kv_lens, backend="reference")
    torch.testing.assert_close(out.double(), _dense_on(q, k, v, kv_lens), atol=2e-5, rtol=1e-4)
