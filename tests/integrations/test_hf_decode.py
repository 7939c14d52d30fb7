"""Decode through the HF integration: greedy generation with left padding, decode methods through
the sparse decode kernel, SparseCache and its KV-policy hook."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
from hf_testutil import cache_kwarg, causal_keep, decode_step_logits, eager_logits, left_padded, make_model

from sparsattn.integrations import hf
from sparsattn.integrations.hf import SparseCache
from sparsattn.methods import Method
from sparsattn.patterns import TokenPattern


@dataclass
class SinkRecent(Method):
    """Test decode method (not registered): the first ``sink`` real tokens and the ``recent`` last ones.

    Decode methods see each sequence's tokens in slots ``[0, kv_lens[b])`` (the integration
    right-aligns left-padded caches for them and maps the picks back)."""

    name = "test_sink_recent"
    paper = "test"
    phase = "decode"
    sink: int = 4
    recent: int = 8

    def select(self, q, k_cache, ctx=None):
        B, H, T = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
        kl = ctx.extras.get("kv_lens")
        kl = torch.full((B,), T, dtype=torch.long) if kl is None else kl.long()
        assert ctx.extras.get("padding_side", "right") == "right"
        j = torch.arange(T)[None, :]
        m = (j < torch.clamp(kl[:, None], max=self.sink)) | ((j >= kl[:, None] - self.recent) & (j < kl[:, None]))
        ctx.state["steps"] = ctx.state.get("steps", 0) + (ctx.layer == 0)
        return TokenPattern.from_mask(m[:, None, :].expand(B, H, T).contiguous(), kv_len=T)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("use_sparse_cache", [False, True])
def test_greedy_generate_left_padding_dense_matches_unpatched(family, use_sparse_cache):
    model = make_model(family, attn_implementation="sdpa")
    ids, am, _ = left_padded(3, 40, [0, 13, 6])
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with hf.patched(model, "dense"):
            extra = {cache_kwarg(model): SparseCache(config=model.config)} if use_sparse_cache else {}
            out = model.generate(ids, **kw, **extra)
    assert out.shape == ref.shape == (3, 48)
    assert torch.equal(out, ref)


def test_decode_method_through_sparse_decode_kernel(decode_patterns):
    """A decode method's TokenPattern (sinks + recent, left padding) equals eager attention whose last
    row sees exactly those keys; the sparse decode kernel is the one that ran."""
    calls = decode_patterns
    model = make_model("llama")
    T = 50
    ids, am, pos = left_padded(2, T, [0, 12])
    nxt = torch.randint(0, 128, (2, 1))
    cache = SparseCache(config=model.config)
    hf.patch(model, SinkRecent(sink=4, recent=8))
    got = decode_step_logits(model, ids, am, pos, nxt, cache)
    assert len(calls) == 4 and cache.state["steps"] == 1
    hf.unpatch(model)
    # reference: eager on the full sequence; the last row sees the sink + recent keys only
    full = torch.cat([ids, nxt], 1)
    am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
    pos2 = torch.cat([pos, pos[:, -1:] + 1], 1)
    keep = causal_keep(T + 1, am2).expand(2, 1, T + 1, T + 1).clone()
    pads = torch.tensor([0, 12])
    j = torch.arange(T + 1)
    for b in range(2):
        rel = j - pads[b]
        keep[b, 0, -1] = ((rel >= 0) & (rel < 4)) | (j >= T + 1 - 8)
    ref = eager_logits(model, full, {l: keep for l in range(4)}, pos2)[:, -1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)
    # and it differs from dense decode (the selection really restricted the keys)
    dense = eager_logits(model, full, {l: causal_keep(T + 1, am2) for l in range(4)}, pos2)[:, -1]
    assert (dense - got).abs().max() > 1e-4


def test_decode_method_without_sparse_decode_module_runs_dense(monkeypatch):
    model = make_model("llama")
    ids, am, pos = left_padded(2, 30, [0, 5])
    nxt = torch.randint(0, 128, (2, 1))
    ref = decode_step_logits(model, ids, am, pos, nxt, SparseCache(config=model.config))
    monkeypatch.setitem(sys.modules, "sparsattn.kernels.sparse_decode", None)  # import now fails
    hf.patch(model, SinkRecent(sink=2, recent=3))
    got = decode_step_logits(model, ids, am, pos, nxt, SparseCache(config=model.config))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)


def test_decode_on_sliding_window_layers_with_decode_method():
    """Gemma3 sliding layers (window 24) clip the decode selection to the window."""
    model = make_model("gemma3")
    T = 40
    ids, am, pos = left_padded(2, T, [0, 7])
    nxt = torch.randint(0, 128, (2, 1))
    hf.patch(model, SinkRecent(sink=3, recent=30))
    got = decode_step_logits(model, ids, am, pos, nxt, SparseCache(config=model.config))
    hf.unpatch(model)
    full = torch.cat([ids, nxt], 1)
    am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
    pos2 = torch.cat([pos, pos[:, -1:] + 1], 1)
    masks = {}
    j = torch.arange(T + 1)
    for l, layer in enumerate(model.model.layers):
        w = layer.self_attn.sliding_window
        keep = causal_keep(T + 1, am2, window=w).expand(2, 1, T + 1, T + 1).clone()
        for b, p in enumerate([0, 7]):
            rel = j - p
            sel = ((rel >= 0) & (rel < 3)) | (j >= T + 1 - 30)
            keep[b, 0, -1] &= sel
        masks[l] = keep
    ref = eager_logits(model, full, masks, pos2)[:, -1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)


class KeepLast:
    """Test KV policy: keep the last ``n`` stored slots of every row (no padding in these tests)."""

    def __init__(self, n):
        self.n = n
        self.calls = []

    def compress(self, layer_idx, keys, values, ctx):
        self.calls.append((layer_idx, ctx.phase, keys.shape[-2], ctx.kv_lens.tolist(), ctx.seen))
        return keys[:, :, -self.n:], values[:, :, -self.n:]


def test_sparse_cache_policy_window_matches_eager_and_keeps_positions():
    """After prefill and after each append the policy keeps the last 12 slots: step t attends to its 12
    predecessors + itself (positions keep counting the tokens seen: RoPE stays right)."""
    model = make_model("llama")
    T, n, steps = 30, 12, 3
    ids = torch.randint(0, 128, (1, T))
    pol = KeepLast(n)
    cache = SparseCache(config=model.config, policy=pol)
    hf.patch(model, "dense")
    ck = cache_kwarg(model)
    toks = ids
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{ck: cache})
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            toks = torch.cat([toks, nxt], 1)
            assert cache.get_seq_length() == toks.shape[1] - 1
            out = model(input_ids=nxt, use_cache=True, **{ck: cache})
            logits.append(out.logits[:, -1])
    hf.unpatch(model)
    assert len(pol.calls) == 4 * (1 + steps)
    assert [c[1] for c in pol.calls[:4]] == ["prefill"] * 4 and pol.calls[4][1] == "decode"
    assert pol.calls[0][2] == T and pol.calls[4][2] == n + 1 and pol.calls[4][4] == T + 1
    assert cache.layers[0].keys.shape[-2] == n
    L = toks.shape[1]
    keep = causal_keep(L).clone()
    for t in range(T, L):
        keep[0, 0, t] &= torch.arange(L) >= t - n
    ref = eager_logits(model, toks, {l: keep for l in range(4)})
    for s in range(steps):
        torch.testing.assert_close(logits[s], ref[:, T + s], rtol=1e-4, atol=2e-5)


def test_sparse_cache_noop_policy_matches_unpatched_generate():
    model = make_model("mistral", attn_implementation="sdpa")
    ids, am, _ = left_padded(2, 36, [0, 8])

    class Clone:
        calls = 0

        def compress(self, layer_idx, keys, values, ctx):
            Clone.calls += 1
            T = keys.shape[-2]
            assert ctx.kv_lens[0] == T and T - 8 <= ctx.kv_lens[1] <= T
            return keys, values

    kw = dict(attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with hf.patched(model, "dense"):
            out = model.generate(ids, **kw, **{cache_kwarg(model): SparseCache(config=model.config, policy=Clone())})
    assert torch.equal(out, ref) and Clone.calls > 0


def test_sparse_cache_bad_policy():
    with pytest.raises(ValueError, match="policy: expected an object with a compress"):
        SparseCache(policy=object())


def test_per_head_decode_mapping():
    """decode={"default": {0: sink+recent, "default": "dense"}}: only query head 0 reads a subset."""
    model = make_model("llama")
    T = 40
    ids, am, pos = left_padded(2, T, [0, 6])
    nxt = torch.randint(0, 128, (2, 1))
    hf.patch(model, "dense", decode={"default": {0: SinkRecent(sink=2, recent=5), "default": "dense"}})
    got = decode_step_logits(model, ids, am, pos, nxt, SparseCache(config=model.config))
    hf.unpatch(model)
    full = torch.cat([ids, nxt], 1)
    am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
    pos2 = torch.cat([pos, pos[:, -1:] + 1], 1)
    keep = causal_keep(T + 1, am2).expand(2, 4, T + 1, T + 1).clone()
    j = torch.arange(T + 1)
    for b, p in enumerate([0, 6]):
        rel = j - p
        keep[b, 0, -1] &= ((rel >= 0) & (rel < 2)) | (j >= T + 1 - 5)
    ref = eager_logits(model, full, {l: keep for l in range(4)}, pos2)[:, -1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", __import__("sparsattn").list_methods("decode"))
def test_every_decode_method_full_budget_left_padded_batch_equals_dense(name):
    """Registered decode methods with a budget covering the cache, batch 3 with different left
    paddings: one decode step gives the dense logits (the integration right-aligns the rows for the
    methods, which read ``kv_lens`` as the first slots, and maps their picks back)."""
    from sparsattn.eval import decode_quality as dq
    from sparsattn.methods import get_method

    model = make_model("llama")
    T = 40
    ids, am, pos = left_padded(3, T, [0, 13, 6])
    nxt = torch.randint(0, 128, (3, 1), generator=torch.Generator().manual_seed(5))
    cfg = dq.budget_config(name, 2 * (T + 1), n_layers=4, group_size=2)  # as decode_quality's "full"
    if name == "double_sparsity":
        cfg["channels"] = {l: [list(range(4))] * 2 for l in range(4)}
    method = get_method(name, **cfg)
    ref = decode_step_logits(model, ids, am, pos, nxt, SparseCache(config=model.config))
    with hf.patched(model, decode=method):
        got = decode_step_logits(model, ids, am, pos, nxt, SparseCache(config=model.config))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)
