"""Every registered prefill method keeps, for every query row, its own diagonal key (causal,
bottom-right aligned), so no row is left without a key: same-length prefill, chunked prefill
(``Tq < Tk``: the queries are the last ``Tq`` tokens of the keys), lengths that are not multiples
of the block size, a chunk shorter than a block.

The loop is over ``sparsattn.list_methods("prefill")``; methods appear only through their declared
presets (``small_config``) and, for calibrated methods, the test-only fits of ``_fits.py``. Each
method runs with its small configuration and with its paper defaults (the defaults of a
calibrated method are its fitted file, so it runs once). Calibrated methods are fitted on the whole
sequence (all ``Tk`` queries) and then select for the chunk, as a chunked prefill would. A method
may refuse chunked prefill with a ``ValueError`` naming ``q tokens`` (LongHeads' attention chunk
keys need every chunk's queries); it must still pass the same-length shapes.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from sparsattn.methods import get_method, list_methods, method_class
from sparsattn.methods.base import SelectContext
from sparsattn.patterns import BlockPattern

from _fits import example_fit  # tests/methods is on sys.path (pytest rootdir-relative import)

METHODS = list_methods("prefill")
SHAPES = [  # (B, Hq, Hkv, Tq, Tk, D)
    (1, 4, 2, 64, 300, 64),   # the repro: 64 queries at the end of 300 keys
    (1, 4, 2, 100, 333, 16),  # chunk and keys not multiples of any block size
    (2, 4, 4, 21, 257, 16),   # a chunk shorter than one block
    (1, 4, 2, 197, 197, 16),  # same-length prefill, odd length
    (1, 4, 2, 1, 130, 16),    # a one-token chunk
]


def _inputs(B, Hq, Hkv, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * 1.5
    k = torch.randn(B, Hkv, T, D, generator=g) * 1.5
    v = torch.randn(B, Hkv, T, D, generator=g)
    return q, k, v


def _instances(name, q_full, k, v):
    """(label, instance) pairs: conformance configuration and paper defaults (calibrated: one fit)."""
    cls = method_class(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls.needs:
            try:
                return [("fit", example_fit(cls, q_full, k, v))]
            except LookupError as e:
                pytest.skip(str(e))
        out = [("defaults", get_method(name))]
        if cls.small_config():
            out.append(("conformance", get_method(name, **cls.small_config())))
        return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", METHODS)
def test_every_row_keeps_its_diagonal_key(name, shape):
    B, Hq, Hkv, Tq, Tk, D = shape
    q_full, k, v = _inputs(B, Hq, Hkv, Tk, D, seed=Tq)
    q = q_full[:, :, Tk - Tq:]
    for label, inst in _instances(name, q_full, k, v):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                p = inst.select(q, k, SelectContext(layer=0, causal=True, extras={"v": v}))
            except ValueError as e:  # a clear refusal of chunked prefill is allowed, never a wrong mask
                if Tq < Tk and str(e).startswith("q tokens"):
                    continue
                raise
        if not isinstance(p, BlockPattern):
            continue  # not a mask (computes its own output parts)
        assert (p.q_len, p.kv_len) == (Tq, Tk)
        m = p.to_dense_mask()  # [B', H', Tq, Tk]
        rows = torch.arange(Tq)
        diag = m[:, :, rows, rows + (Tk - Tq)]  # [B', H', Tq]
        missing = (~diag).nonzero()
        assert missing.shape[0] == 0, (
            f"{name} ({label}): {missing.shape[0]} (batch, head, row) triples miss their diagonal key, "
            f"first {missing[:3].tolist()}; rows without any key: {int((~m.any(-1)).sum())}")
        causal = rows[:, None] + (Tk - Tq) >= torch.arange(Tk)[None, :]
        assert not (m & ~causal).any(), f"{name} ({label}): a pair above the diagonal"
