"""Needle coverage of decode selections (issue 21): a hand-made case for NeedleRecorder, the needle's
cache positions of a passkey prompt, and decode runs on the bundled model (every token keeps every
needle; StreamingLLM's sink + window at a 64-token budget loses a needle in the middle)."""
from __future__ import annotations

import pytest
import torch

from sparsattn.eval.decode_needle import NeedleRecorder, needle_keys
from sparsattn.methods.base import Method, SelectContext
from sparsattn.patterns import TokenPattern


class _Fixed(Method):
    """Returns a fixed selection (a stand-in decode method)."""

    phase = "decode"

    def __init__(self, sel):
        self.sel = sel

    def select(self, q, k, ctx=None):
        return TokenPattern.from_mask(self.sel, kv_len=k.shape[2])


def test_needle_recorder_hand_made():
    T, D = 40, 8
    k = torch.zeros(1, 1, T, D)
    k[0, 0, 10:13, 0] = 1.0  # the needle: positions 10..12
    q = torch.zeros(1, 2, 1, D)
    q[0, 0, 0, 0] = 20.0  # head 0 reads the needle (mass ~1); head 1 attends uniformly (mass 3/40 < 0.1)
    sel = torch.zeros(1, 1, T, dtype=torch.bool)
    sel[..., 11:] = True  # keeps 2 of the 3 needle tokens
    m = _Fixed(sel)
    with NeedleRecorder(m, [10, 11, 12], threshold=0.1, keep=0.5) as rec:
        m.select(q, k, SelectContext(layer=0, scale=1.0))  # inactive: not recorded
        assert rec.summary()["needle_reading"] is None
        rec.active = True
        m.select(q, k, SelectContext(layer=0, scale=1.0))
    s = rec.summary()
    assert s["needle_reading"] == 1 and s["needle_kept"] == 1 and s["heads"][0][:2] == [0, 0]
    assert s["heads"][0][3] == pytest.approx(2 / 3, abs=1e-3)  # 2 of 3 equally attended needle tokens kept
    sel[..., 11] = False  # 1 of 3 kept: below keep=0.5
    with NeedleRecorder(m, [10, 11, 12]) as rec:
        rec.active = True
        m.select(q, k, SelectContext(layer=0, scale=1.0))
    assert rec.summary()["needle_kept"] == 0
    with pytest.raises(ValueError, match="keep"):
        NeedleRecorder(m, [1], keep=0.0)
    with pytest.raises(ValueError, match="needle"):
        NeedleRecorder(m, [])


@pytest.fixture()
def no_grad():
    """Gradients off for one test only: a process-wide switch would break the training tests that run
    later in the same worker."""
    with torch.no_grad():
        yield


def test_decode_runs_report_needle_coverage(bundled, no_grad):
    from sparsattn.eval import decode_quality as dq
    from sparsattn.eval.tasks import passkey
    from sparsattn.methods import get_method

    model, tok = bundled
    s = passkey(tok, 256, 0.5, seed=5)
    ids, n_pre = dq.split_prompt(tok, s)
    nk = needle_keys(tok, ids, n_pre, s.answers[0])
    assert nk is not None and nk[1] == 8  # " " + 7 digits, one token each
    assert tok.decode([ids[i] for i in nk[0]]).strip() == s.answers[0]
    t = torch.tensor([ids])
    kv = dq.prefill(model, t[:, :n_pre])
    full = dq.decode_run(model, kv, t[:, n_pre:], max_new_tokens=8, method=dq.AllTokens(), backend="reference",
                         needle=nk)
    assert full.needle["needle_reading"] > 0 and full.needle["needle_kept"] == full.needle["needle_reading"]
    cfg = dq.budget_config("streaming_llm", 64, n_layers=8, group_size=4)
    sl = dq.decode_run(model, kv, t[:, n_pre:], max_new_tokens=8, method=get_method("streaming_llm", **cfg),
                       backend="reference", needle=nk)
    assert sl.needle["needle_reading"] > 0 and sl.needle["needle_kept"] < sl.needle["needle_reading"]
    none = dq.decode_run(model, kv, t[:, n_pre:], max_new_tokens=2, method=dq.AllTokens(), backend="reference")
    assert none.needle == {}  # not asked for
    agg = dq._needle_agg([{"needle_reading": 4, "needle_kept": 1, "needle_kept_fraction": 0.5},
                          {"needle_reading": 0, "needle_kept": 0, "needle_kept_fraction": None},
                          {"needle_reading": None}])
    assert agg == {"needle_reading": 4, "needle_kept": 1, "needle_coverage": 0.25, "needle_kept_fraction": 0.5}
