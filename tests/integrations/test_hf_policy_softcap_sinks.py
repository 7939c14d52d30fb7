"""KV policies on Gemma 2 (logit soft-capping) and gpt-oss (learned sinks) through the patched HF attention
(issue 16.2): the rows a policy leaves (per-head lengths, merged-slot log-weights, head groups) are
attended by ``SparseCache.attend`` with the cap and the sinks.

Tiny random models of tests/integrations/test_hf_softcap_sinks.py (a sliding-window layer, then a full
one; policies run on the full layer). A policy that keeps every slot but gives them log-weights (0)
sends every decode step and a several-token forward through ``SparseCache.attend`` and equals eager
attention; MoA with different spans per KV head (rows of different lengths, head groups) equals eager
attention with the equivalent per-head masks; RazorAttention (merged slots) runs and differs.
"""
from __future__ import annotations

import pytest
import torch
from hf_testutil import cache_kwarg, causal_keep, eager_logits, left_padded
from test_hf_kv_policy import _decode_masks
from test_hf_softcap_sinks import _gemma2, _gpt_oss

from sparsattn.integrations import hf
from sparsattn.integrations.hf import SparseCache
from sparsattn.kv import MoAPolicy, RazorAttentionPolicy

T, PADS, STEPS, WINDOW = 28, [0, 5], 3, 12
FULL = 1  # the full-attention layer (layer 0 slides: its own window, no policy)


def _model(family):
    return _gemma2() if family == "gemma2" else _gpt_oss()


class _KeepAllWeighted:
    """Keeps every slot of the full layer and declares each a plain token (log-weight 0): attention on the
    layer must then go through ``SparseCache.attend`` (a per-sequence padding no longer describes it)."""

    def compress(self, layer_idx, keys, values, ctx):
        if not ctx.extras.get("sliding"):
            ctx.log_weight = torch.zeros(keys.shape[:3])
        return keys, values


def _run(model, ids, am, cache, steps, last):
    """Prefill (logits [B, T, V]), one decode step per column of ``steps`` ([n, B, V]) and one forward of
    the tokens ``last [B, m]`` (several queries on the cache, [B, m, V])."""
    ck = cache_kwarg(model)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    dec = []
    with torch.no_grad(), hf.patched(model, "dense"):
        pre = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, **{ck: cache}).logits
        m, p = am, pos
        for s in range(steps.shape[1]):
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            p = torch.cat([p, p[:, -1:] + 1], 1)
            dec.append(model(input_ids=steps[:, s:s + 1], attention_mask=m, position_ids=p[:, -1:], use_cache=True,
                             **{ck: cache}).logits[:, -1])
        m = torch.cat([m, torch.ones_like(last)], 1)
        p2 = p[:, -1:] + 1 + torch.arange(last.shape[1])
        out = model(input_ids=last, attention_mask=m, position_ids=p2, use_cache=True, **{ck: cache}).logits
    return pre, torch.stack(dec), out


def _tokens():
    ids, am, _ = left_padded(2, T, PADS)
    g = torch.Generator().manual_seed(4)
    return ids, am, torch.randint(0, 128, (2, STEPS), generator=g), torch.randint(0, 128, (2, 3), generator=g)


def _compare(pre, dec, last, ref, am):
    """Patched logits against eager logits ``ref [B, L, V]`` of the whole token sequence."""
    valid = am.bool()  # prompt rows of padding slots are not compared (eager averages over nothing)
    torch.testing.assert_close(pre[valid], ref[:, :T][valid], rtol=1e-4, atol=1e-4)
    for s in range(dec.shape[0]):
        torch.testing.assert_close(dec[s], ref[:, T + s], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, ref[:, T + dec.shape[0]:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_keep_all_policy_through_sparse_cache_attend_equals_eager(family):
    model = _model(family)
    ids, am, steps, last = _tokens()
    cache = SparseCache(config=model.config, policy=_KeepAllWeighted())
    pre, dec, out = _run(model, ids, am, cache, steps, last)
    assert cache.needs_attend(FULL) and cache.log_weights(FULL) is not None
    full = torch.cat([ids, steps, last], 1)
    fam = torch.cat([am, torch.ones_like(steps), torch.ones_like(last)], 1)
    with torch.no_grad():
        ref = model(input_ids=full, attention_mask=fam, position_ids=(fam.cumsum(-1) - 1).clamp(min=0)).logits
    _compare(pre, dec, out, ref, am)


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_moa_per_head_spans_equal_eager_per_head_masks(family):
    """Rows of different lengths per KV head, stored as head groups: the decode kernel per group (its query
    heads' sinks) for one query, the float32 masked softmax per group for several."""
    model = _model(family)
    ids, am, steps, last = _tokens()
    n_sink, spans = 2, [5, 9]
    pol = MoAPolicy(alpha=[spans] * 2, beta=[[0.0, 0.0]] * 2, n_sink=n_sink)
    cache = SparseCache(config=model.config, policy=pol)
    pre, dec, out = _run(model, ids, am, cache, steps, last)
    assert cache.head_groups(FULL) is not None  # really grouped
    assert cache.head_lens(FULL).tolist() == [[n_sink + s for s in spans]] * 2
    full = torch.cat([ids, steps, last], 1)

    def sees(b, s, h, j):
        return (j < n_sink) | (j >= T - PADS[b] + min(s, STEPS) - spans[h])

    keep, fam, pos = _decode_masks(full, PADS, T, STEPS + last.shape[1], sees)
    ref = eager_logits(model, full, {0: causal_keep(full.shape[1], fam, window=WINDOW), FULL: keep}, pos)
    _compare(pre, dec, out, ref, am)
    dense = eager_logits(model, full, {0: causal_keep(full.shape[1], fam, window=WINDOW),
                                       FULL: causal_keep(full.shape[1], fam)}, pos)
    assert (dense[:, T:] - ref[:, T:]).abs().max() > 1e-3  # the spans really change the result


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_razor_attention_with_merged_slots_runs_and_differs(family):
    model = _model(family)
    ids, am, steps, last = _tokens()
    pol = RazorAttentionPolicy(retrieval_heads={FULL: [1]}, n_sink=2, compression=5.0, min_window=6)
    cache = SparseCache(config=model.config, policy=pol)
    pre, dec, out = _run(model, ids, am, cache, steps, last)
    assert cache.needs_attend(FULL) and cache.policy_reports[FULL]["merged_tokens"] > 0
    assert torch.isfinite(dec).all() and torch.isfinite(out).all()
    full = torch.cat([ids, steps, last], 1)
    fam = torch.cat([am, torch.ones_like(steps), torch.ones_like(last)], 1)
    with torch.no_grad():
        ref = model(input_ids=full, attention_mask=fam, position_ids=(fam.cumsum(-1) - 1).clamp(min=0)).logits
    assert (dec[-1] - ref[:, T + STEPS - 1]).abs().max() > 1e-3


def test_a_method_computing_its_output_names_softcap_and_sinks_as_the_fallback_reason():
    """HyperAttention attends by itself (no cap, no sinks): on these models it falls back to dense attention
    and the report says why (the cap / the sinks; the window only on the sliding layer, no padding)."""
    for family, what in (("gemma2", "softcap"), ("gpt_oss", "sinks")):
        model = _model(family)
        ids = torch.randint(0, 128, (1, T))
        with torch.no_grad():
            ref = model(ids).logits
            with hf.patched(model, "hyper") as rep:
                out = model(ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        reasons = {f.layer: f.reason for f in rep.fallbacks.values()}
        assert reasons[FULL].endswith(f"computes its own output: not with {what}"), reasons
        assert "padding" not in reasons[0] and "a sliding window" in reasons[0] and what in reasons[0], reasons
