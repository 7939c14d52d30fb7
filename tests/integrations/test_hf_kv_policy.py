"""sparsattn.kv policies inside Hugging Face generation (SparseCache + as_cache_policy): keep-all equals
dense generation, StreamingLLM / MoA equal an eager run with the equivalent (per-head) masks and keep
exactly what they promise, RazorAttention keeps full rows for retrieval heads and never loses a token."""
from __future__ import annotations

import math

import pytest
import torch
from hf_testutil import cache_kwarg, causal_keep, eager_logits, greedy_steps, left_padded, make_model

from sparsattn.integrations import hf
from sparsattn.integrations.hf import SparseCache
from sparsattn.kv import (CachePolicy, KVCache, MoAPolicy, RazorAttentionPolicy, StreamingLLMPolicy, ZipVLPolicy,
                          as_cache_policy)
from sparsattn.kv.adapter import left_to_slots, slots_to_left

N_LAYERS, HQ, HKV = 4, 4, 2


def _decode_masks(toks, pads, T, steps, sees):
    """Eager keep-masks [B, HQ, L, L] and position ids for ``toks`` (prompt of T padded tokens + decode
    inputs): prompt rows causal; the row of decode step s of sequence b sees the real positions j with
    ``sees(b, s, kv_head, j)`` (bool over j = 0..p) besides causality."""
    B, L = toks.shape
    am = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        am[b, :p] = 0
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    keep = causal_keep(L, am).expand(B, HQ, L, L).clone()
    for b in range(B):
        j = torch.arange(L) - pads[b]
        for s in range(steps):
            p = T - pads[b] + s
            for hq in range(HQ):
                keep[b, hq, T + s] = (j >= 0) & (j <= p) & sees(b, s, hq // (HQ // HKV), j)
    return keep, am, pos


def test_keep_all_policy_generation_equals_dense():
    model = make_model("llama", attn_implementation="sdpa")
    ids, am, _ = left_padded(3, 40, [0, 13, 6])
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    pol = StreamingLLMPolicy(n_sink=4, window=10_000)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        cache = SparseCache(config=model.config, policy=pol)
        with hf.patched(model, "dense"):
            out = model.generate(ids, **kw, **{cache_kwarg(model): cache})
    assert torch.equal(out, ref)
    assert isinstance(cache.policy, CachePolicy) and cache.policy.policy is pol
    assert sorted(cache.policy_reports) == list(range(N_LAYERS))
    for l in range(N_LAYERS):
        rep = cache.policy_reports[l]
        assert rep["slots_after"] == rep["slots_before"] == HKV * sum(40 + 7 - p for p in (0, 13, 6))
        assert cache.head_pad(l)[:, 0].tolist() == [0, 13, 6]


@pytest.mark.parametrize("every", [1, 3])
def test_streaming_llm_evicts_to_sinks_plus_window_and_matches_eager(every):
    model = make_model("llama")
    T, steps, n_sink, window = 30, 7, 4, 8
    pads = [0, 7]
    ids, am, pos = left_padded(2, T, pads)
    pol = as_cache_policy(StreamingLLMPolicy(n_sink=n_sink, window=window), every=every)
    cache = SparseCache(config=model.config, policy=pol)
    hf.patch(model, "dense")
    toks, got, _ = greedy_steps(model, ids, am, pos, cache, steps)
    hf.unpatch(model)
    # the cache holds exactly the sinks + the window after each policy run (every > 1: the tokens since)
    extra = steps % every
    for l in range(N_LAYERS):
        assert cache.layers[l].keys.shape[-2] == n_sink + window + extra
        assert cache.head_pad(l).eq(0).all()
        assert cache.get_seq_length(l) == T + steps  # tokens seen: positions keep counting
        rep = cache.policy_reports[l]
        assert rep["slots_after"] == 2 * HKV * (n_sink + window) < rep["slots_before"]
        assert rep["bytes_after"] < rep["bytes_before"]
        assert rep["bytes_after"] == 2 * HKV * (n_sink + window) * 2 * 16 * 4  # B*H*slots * (K+V) * D * fp32
    assert cache.nbytes() < sum(2 * 2 * HKV * (T + steps) * 16 * 4 for _ in range(N_LAYERS))

    def sees(b, s, h, j):
        # the policy last ran when `every` decode steps had passed (or at the prefill)
        last_seen = T - pads[b] + (s // every) * every
        return (j < n_sink) | (j >= last_seen - window)

    keep, am2, pos2 = _decode_masks(toks, pads, T, steps, sees)
    ref = eager_logits(model, toks, {l: keep for l in range(N_LAYERS)}, pos2)
    for s in range(steps):
        torch.testing.assert_close(got[s], ref[:, T + s], rtol=1e-4, atol=2e-5)
    assert torch.equal(toks[:, T + 1:], ref[:, T:T + steps - 1].argmax(-1))  # greedy choices agree
    dense = eager_logits(model, toks, {l: causal_keep(toks.shape[1], am2) for l in range(N_LAYERS)}, pos2)
    assert (dense[:, T + steps - 1] - got[-1]).abs().max() > 1e-4  # eviction really changed the result


def test_moa_per_head_spans_match_eager_per_head_masks():
    """Different spans per KV head leave rows of different lengths (plus left padding): attention goes
    through SparseCache.attend, one query (sparse decode kernel) and two queries (masked dense)."""
    model = make_model("llama")
    T, steps, n_sink = 32, 5, 2
    spans = [5, 9]
    pads = [0, 9]
    ids, am, pos = left_padded(2, T, pads)
    pol = MoAPolicy(alpha=[spans] * N_LAYERS, beta=[[0.0, 0.0]] * N_LAYERS, n_sink=n_sink)
    cache = SparseCache(config=model.config, policy=pol)
    two = torch.randint(0, 128, (2, 2), generator=torch.Generator().manual_seed(3))
    hf.patch(model, "dense")
    toks, got, last = greedy_steps(model, ids, am, pos, cache, steps, extra_last=two)
    hf.unpatch(model)
    for l in range(N_LAYERS):
        n = cache.head_lens(l)
        assert n.tolist() == [[n_sink + s for s in spans]] * 2
        assert cache.needs_attend(l)  # ragged rows: a per-sequence padding cannot describe them
    full = torch.cat([toks, two], 1)

    def sees(b, s, h, j):
        last_seen = T - pads[b] + min(s, steps)  # the two-token forward sees what was kept after step 4
        return (j < n_sink) | (j >= last_seen - spans[h])

    keep, _, pos2 = _decode_masks(full, pads, T, steps + 2, sees)
    ref = eager_logits(model, full, {l: keep for l in range(N_LAYERS)}, pos2)
    for s in range(steps):
        torch.testing.assert_close(got[s], ref[:, T + s], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(last, ref[:, T + steps:], rtol=1e-4, atol=2e-5)


def _plain_keys(model, toks, am):
    """Keys of every layer from a dense forward of ``toks`` (left-padded), [B, Hkv, L, D]."""
    from transformers import DynamicCache

    pos = (am.cumsum(-1) - 1).clamp(min=0)
    c = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=toks, attention_mask=am, position_ids=pos, use_cache=True, **{cache_kwarg(model): c})
    return [c.layers[l].keys for l in range(N_LAYERS)]


def test_razor_keeps_retrieval_heads_whole_and_folds_the_rest():
    model = make_model("llama")
    T, steps, pads = 40, 5, [0, 9]
    ids, am, pos = left_padded(2, T, pads)
    pol = RazorAttentionPolicy(retrieval_heads={l: [1] for l in range(N_LAYERS)}, n_sink=2, compression=5.0,
                               min_window=6)
    cache = SparseCache(config=model.config, policy=pol)
    hf.patch(model, "dense")
    toks, got, _ = greedy_steps(model, ids, am, pos, cache, steps)
    hf.unpatch(model)
    assert torch.isfinite(got).all()
    seen = [T - p + steps for p in pads]  # real tokens seen per sequence
    am_t = torch.ones_like(toks)
    for b, p in enumerate(pads):
        am_t[b, :p] = 0
    plain = _plain_keys(model, toks, am_t)
    for l in range(N_LAYERS):
        k = cache.layers[l].keys
        n = cache.head_lens(l)
        lw = cache.log_weights(l)
        for b in range(2):
            win = max(6, seen[b] // 5)
            assert n[b].tolist() == [2 + win + 1, seen[b]]  # head 0: sinks + window + compensation
            # retrieval head: every token, unmerged; its prompt keys are the dense model's keys
            assert lw[b, 1].abs().max() == 0
            kb = k[b, 1, -seen[b]:]
            R = T - pads[b]
            torch.testing.assert_close(kb[:R], plain[l][b, 1, pads[b]:T], rtol=1e-5, atol=1e-5)
            if l == 0:  # layer 0 keys depend on the tokens only: the generated ones match too
                torch.testing.assert_close(kb, plain[0][b, 1, pads[b]:], rtol=1e-5, atol=1e-5)
            # head 0: the slot weights add up to the tokens seen (nothing lost), one merged slot
            w = lw[b, 0, -int(n[b, 0]):].double().exp()
            assert math.isclose(float(w.sum()), seen[b], rel_tol=1e-6)
            assert int((lw[b, 0] != 0).sum()) == 1
            assert lw[b, 0, -1] != 0  # the compensation slot is written after the kept ones
            if l == 0:  # the window of head 0 is the last real tokens
                torch.testing.assert_close(k[b, 0, -win - 1:-1], plain[0][b, 0, -win:], rtol=1e-5, atol=1e-5)
        rep = cache.policy_reports[l]
        assert rep["bytes_after"] < rep["bytes_before"] and rep["merged_tokens"] > 0
    # compression changed the result against dense attention
    keep = causal_keep(toks.shape[1], am_t)
    dense = eager_logits(model, toks, {l: keep for l in range(N_LAYERS)}, (am_t.cumsum(-1) - 1).clamp(min=0))
    assert (dense[:, -1] - got[-1]).abs().max() > 1e-4


@pytest.mark.parametrize("n_new", [1, 3])
def test_attend_equals_kvcache_attend_with_razor(n_new):
    """SparseCache driven by hand (left padding, ragged heads, merged slots) attends exactly like a
    sparsattn.kv.KVCache holding the same tokens under the same policy."""
    torch.manual_seed(0)
    B, H, D, T = 2, 2, 16, 30
    pads = torch.tensor([0, 6])
    am = (torch.arange(T)[None, :] >= pads[:, None]).long()
    k0, v0 = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    pol = RazorAttentionPolicy(retrieval_heads={0: [0]}, n_sink=2, compression=8.0, min_window=5)
    sc = SparseCache(policy=pol)
    sc.begin_forward(am)
    sc.update(k0, v0, 0)
    ref = KVCache(1, B, H, D, dtype=torch.float32)
    ref.append(0, left_to_slots(k0, T - pads[:, None].expand(B, H)), left_to_slots(v0, T - pads[:, None].expand(B, H)),
               lens=T - pads)
    pol.apply(ref, 0)
    for step in range(3):
        k1, v1 = torch.randn(B, H, n_new, D), torch.randn(B, H, n_new, D)
        keys, values = sc.update(k1, v1, 0)
        q = torch.randn(B, 4, n_new, D)
        out = sc.attend(0, q, keys, values, scale=0.3, backend="reference")
        assert out is not None and out.shape == (B, 4, n_new, D)
        for t in range(n_new):  # KVCache path: append the new tokens one by one and attend
            ref.append(0, k1[:, :, t:t + 1], v1[:, :, t:t + 1])
            want = ref.attend(0, q[:, :, t], scale=0.3, backend="reference")
            torch.testing.assert_close(out[:, :, t], want, rtol=1e-5, atol=1e-5)
        pol.apply(ref, 0)
        assert sc.needs_attend(0)
        assert torch.equal(sc.head_lens(0), ref.lengths(0))
    with pytest.raises(ValueError, match="per-head lengths"):
        sc.attention_pad(0)


def test_row_alignment_round_trip():
    x = torch.arange(2 * 2 * 5).view(2, 2, 5).float()
    n = torch.tensor([[5, 2], [0, 3]])
    s = left_to_slots(x, n, fill=-1)
    assert s[0, 1].tolist() == [8, 9, -1, -1, -1] and s[1, 0].tolist() == [-1] * 5
    back = slots_to_left(s, n, 5, fill=-1)
    want = torch.where(torch.arange(5) >= 5 - n[..., None], x, torch.full_like(x, -1))
    assert torch.equal(back, want)
    assert slots_to_left(s, n, 3, fill=0)[1, 1].tolist() == [17, 18, 19]


def test_bad_policies_and_unpatched_model():
    with pytest.raises(ValueError, match="ZipVL"):
        SparseCache(policy=ZipVLPolicy())
    with pytest.raises(ValueError, match="every"):
        as_cache_policy(StreamingLLMPolicy(), every=0)
    with pytest.raises(ValueError, match="policy: expected an object with a compress"):
        SparseCache(policy=object())
    assert as_cache_policy(as_cache_policy(StreamingLLMPolicy())).every == 1
    model = make_model("llama", attn_implementation="sdpa")
    cache = SparseCache(config=model.config, policy=StreamingLLMPolicy(n_sink=2, window=4))
    with pytest.raises(ValueError, match="patched"), torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 10)), use_cache=True, **{cache_kwarg(model): cache})


def test_sliding_window_layers_keep_their_own_window():
    """Qwen2 with sliding layers 2-3 (window 24): the policy runs on the full-attention layers only;
    with a window covering everything generation equals dense."""
    model = make_model("qwen2", attn_implementation="sdpa")
    ids, am, _ = left_padded(2, 40, [0, 9])
    kw = dict(attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        keep_all = SparseCache(config=model.config, policy=StreamingLLMPolicy(n_sink=4, window=10_000))
        evict = SparseCache(config=model.config, policy=StreamingLLMPolicy(n_sink=2, window=6))
        with hf.patched(model, "dense"):
            out = model.generate(ids, **kw, **{cache_kwarg(model): keep_all})
            model.generate(ids, **kw, **{cache_kwarg(model): evict})
    assert torch.equal(out, ref)
    assert sorted(evict.policy_reports) == [0, 1]
    assert [evict.layers[l].keys.shape[-2] for l in range(N_LAYERS)] == [8, 8, 23, 23]
