"""SparseCache head groups: a layer whose KV heads keep different lengths (RazorAttention, MoA) is
stored as per-group tensors; generation is the same as with the single padded tensor
(group_waste=1), the bytes follow the per-head lengths, and the grouped keys cannot be misused."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from hf_testutil import cache_kwarg, greedy_steps, left_padded, make_model

from sparsattn.integrations import hf
from sparsattn.integrations.hf import GroupedKV, GroupedLayer, SparseCache
from sparsattn.kv import MoAPolicy, RazorAttentionPolicy, StreamingLLMPolicy, as_cache_policy

N_LAYERS = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _razor(layers=N_LAYERS, retrieval=(1,), min_window=6, compression=5.0):
    return RazorAttentionPolicy(retrieval_heads={l: list(retrieval) for l in range(layers)}, n_sink=2,
                                compression=compression, min_window=min_window)


def _moa(spans, layers=N_LAYERS):
    return MoAPolicy(alpha=[list(spans)] * layers, beta=[[0.0] * len(spans)] * layers, n_sink=2)


def _run_both(model, policy_fn, ids, am, pos, steps, extra_last=None, method="dense"):
    """The same generation with grouped storage (default group_waste) and one padded tensor."""
    res = {}
    for gw in (0.1, 1.0):
        cache = SparseCache(config=model.config, policy=policy_fn(), group_waste=gw)
        with hf.patched(model, method):
            toks, logits, last = greedy_steps(model, ids, am, pos, cache, steps, extra_last)
            logits = logits.float() if last is None else torch.cat([logits.float(), last[None, :, -1].float()])
        res[gw] = (toks, logits, cache)
    return res


def _valid(x, lens):
    """The valid (last ``lens[b, h]``) slots of rows ``x [B, H, T, ...]`` as a list per (b, h)."""
    T = x.shape[2]
    return [[x[b, h, T - int(lens[b, h]):] for h in range(x.shape[1])] for b in range(x.shape[0])]


def _same_rows(c1: SparseCache, c2: SparseCache, layer: int, **tol):
    """Grouped cache ``c1`` holds what the single-tensor cache ``c2`` holds (materialised accessors): the same
    row lengths and log-weights, the same K/V (bit-equal unless ``tol``: the layers after the first see
    attention outputs that differ by rounding)."""
    n1, n2 = c1.head_lens(layer), c2.head_lens(layer)
    assert torch.equal(n1.cpu(), n2.cpu())
    T1 = c1.layers[layer].keys.shape[2]
    assert torch.equal(c1.head_pad(layer).cpu(), (T1 - n1).cpu())
    for name in ("keys", "values"):
        a, b = _valid(getattr(c1.layers[layer], name), n1), _valid(getattr(c2.layers[layer], name), n2)
        for ra, rb in zip(a, b):
            for xa, xb in zip(ra, rb):
                if tol:
                    torch.testing.assert_close(xa, xb, **tol)
                else:
                    assert torch.equal(xa, xb)
    lw1, lw2 = c1.log_weights(layer), c2.log_weights(layer)
    assert (lw1 is None) == (lw2 is None)
    if lw1 is not None:
        for ra, rb in zip(_valid(lw1[..., None], n1), _valid(lw2[..., None], n2)):
            for xa, xb in zip(ra, rb):
                assert torch.equal(xa, xb)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["razor", "moa", "razor_every3"])
def test_grouped_generation_equals_single_tensor(kind, dtype, device):
    """Batch 2 with left padding, 5 greedy steps (one query: decode kernel per group) then a two-token
    forward (several queries: dense per group): same tokens, logits within bf16/fp32 tolerance, same
    rows kept; the layers really are grouped."""
    if dtype == torch.bfloat16 and kind == "razor_every3":
        pytest.skip("covered in float32")
    model = make_model("llama").to(device=device, dtype=dtype)
    T, steps = 40, 5
    ids, am, pos = (t.to(device) for t in left_padded(2, T, [0, 9]))
    two = torch.randint(0, 128, (2, 2), generator=torch.Generator().manual_seed(3)).to(device)
    pol = {"razor": _razor, "moa": lambda: _moa([5, 9]),
           "razor_every3": lambda: as_cache_policy(_razor(), every=3)}[kind]
    res = _run_both(model, pol, ids, am, pos, steps, extra_last=two)
    (tg, lg, cg), (t1, l1, c1) = res[0.1], res[1.0]
    assert torch.equal(tg, t1)
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lg, l1, **tol)
    assert torch.isfinite(lg).all()
    for l in range(N_LAYERS):
        assert isinstance(cg.layers[l], GroupedLayer) and not isinstance(c1.layers[l], GroupedLayer)
        assert sorted(h for heads, _ in cg.head_groups(l) for h in heads) == [0, 1]
        assert len(cg.head_groups(l)) == 2 and c1.head_groups(l) is None
        assert cg.get_seq_length(l) == c1.get_seq_length(l) == T + steps + 2
        _same_rows(cg, c1, l, **({} if l == 0 else tol))
        assert cg.nbytes(l) < c1.nbytes(l)


def test_groups_follow_the_policy_between_runs_by_hand():
    """Cache driven by hand (no model): prefill, then 1- and 3-token appends with the policy running every
    second step; after each update the grouped cache attends and stores exactly like group_waste=1."""
    torch.manual_seed(0)
    B, H, D, T = 2, 4, 8, 30
    pads = torch.tensor([0, 6])
    am = (torch.arange(T)[None, :] >= pads[:, None]).long()
    caches = [SparseCache(policy=as_cache_policy(_razor(1, retrieval=(0, 2), min_window=4, compression=6.0),
                                                 every=2), group_waste=gw) for gw in (0.1, 1.0)]
    k0, v0 = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    for c in caches:
        c.begin_forward(am)
        c.update(k0, v0, 0)
    for step, n_new in enumerate([1, 1, 3, 1, 3, 1]):
        k1, v1 = torch.randn(B, H, n_new, D), torch.randn(B, H, n_new, D)
        q = torch.randn(B, 2 * H, n_new, D)
        outs = []
        for c in caches:
            c.begin_forward(None)
            keys, values = c.update(k1, v1, 0)
            outs.append(c.attend(0, q, keys, values, scale=0.3, backend="reference"))
        assert isinstance(keys, torch.Tensor) and not isinstance(keys, GroupedKV)  # the single-tensor cache
        assert outs[0] is not None and outs[1] is not None and outs[0].shape == (B, 2 * H, n_new, D)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        g, one = caches
        groups = g.head_groups(0)
        assert groups is not None and [h for h, _ in groups] == [[0, 2], [1, 3]]
        lens = g.head_lens(0)
        for heads, cap in groups:
            assert cap == int(lens[:, heads].max())  # each group's capacity is its longest row
        _same_rows(g, one, 0)
        assert g.get_seq_length(0) == one.get_seq_length(0) == T + sum([1, 1, 3, 1, 3, 1][:step + 1])
    # reorder (beam search) keeps them in step
    beam = torch.tensor([1, 1])
    for c in caches:
        c.reorder_cache(beam)
    _same_rows(caches[0], caches[1], 0)
    assert caches[0].head_lens(0)[0].tolist() == caches[0].head_lens(0)[1].tolist()


def test_memory_follows_per_head_lengths_eight_kv_heads():
    """RazorAttention with 1 retrieval head of 8 (and MoA with spread spans): the grouped bytes are the sum
    over groups of B*H_g*cap_g*D*2*itemsize plus per-slot log-weights and positions and the policy's state,
    far below the single padded tensor."""
    model = make_model("llama", num_attention_heads=8, num_key_value_heads=8)
    B, T, steps, D = 2, 96, 3, 16
    ids, am, pos = left_padded(B, T, [0, 11])
    item = torch.empty(0).element_size()
    cases = {"razor": lambda: _razor(retrieval=(3,), min_window=4, compression=8.0),
             "moa": lambda: _moa([4, 4, 8, 8, 16, 16, 64, 64])}
    for kind, pol in cases.items():
        res = _run_both(model, pol, ids, am, pos, steps)
        cg, c1 = res[0.1][2], res[1.0][2]
        assert torch.equal(res[0.1][0], res[1.0][0])
        for l in range(N_LAYERS):
            groups = cg.head_groups(l)
            assert groups is not None
            lens = cg.head_lens(l)
            assert torch.equal(lens, c1.head_lens(l))
            want = 0
            for heads, cap in groups:
                assert cap == int(lens[:, heads].max())
                want += B * len(heads) * cap * D * 2 * item  # K and V
                want += B * len(heads) * cap * 8  # int64 original position per slot (kept in the store)
                if cg.log_weights(l) is not None:
                    want += B * len(heads) * cap * 4  # float32 log-weight per slot
            want += sum(t.numel() * t.element_size() for t in cg.policy_state[l].values()
                        if isinstance(t, torch.Tensor))
            assert cg.nbytes(l) == want
        if kind == "razor":
            for l in range(N_LAYERS):
                assert [3] in [h for h, _ in cg.head_groups(l)]  # the retrieval head has its own group
            assert cg.nbytes() < 0.6 * c1.nbytes()
        else:
            assert cg.nbytes() < 0.8 * c1.nbytes()


class _KeepLastOfHead0:
    """A compress policy (the plain interface, not a sparsattn.kv policy): KV head 0 keeps its last ``m``
    slots on every layer, sliding ones included; the other heads keep everything."""

    def __init__(self, m: int):
        self.m = m

    def compress(self, layer_idx, keys, values, ctx):
        hl = ctx.head_lens.clone().long()
        hl[:, 0] = hl[:, 0].clamp(max=self.m)
        T = keys.shape[2]
        T2 = int(hl.max())
        ctx.head_lens = hl
        return keys[:, :, T - T2:], values[:, :, T - T2:]


def test_sliding_window_layers_grouped():
    """Qwen2 with sliding layers 2-3 (window 24): a policy that shortens one head on every layer groups the
    sliding layers too; generation past the window equals group_waste=1."""
    model = make_model("qwen2")
    ids, am, pos = left_padded(2, 30, [0, 7])
    two = torch.randint(0, 128, (2, 2), generator=torch.Generator().manual_seed(5))
    res = _run_both(model, lambda: _KeepLastOfHead0(5), ids, am, pos, 6, extra_last=two)
    (tg, lg, cg), (t1, l1, c1) = res[0.1], res[1.0]
    assert torch.equal(tg, t1)
    torch.testing.assert_close(lg, l1, rtol=1e-4, atol=2e-5)
    assert [bool(getattr(cg.layers[l], "is_sliding", False)) for l in range(N_LAYERS)] == [False, False, True, True]
    for l in range(N_LAYERS):
        assert isinstance(cg.layers[l], GroupedLayer)
        _same_rows(cg, c1, l, **({} if l == 0 else dict(rtol=1e-4, atol=2e-5)))
        assert cg.get_seq_length(l) == c1.get_seq_length(l)
    # transformers 5.2x passes the query length, older versions cache_position
    arg = 1 if "query_length" in inspect.signature(type(c1.layers[0]).get_mask_sizes).parameters else torch.arange(1)
    for l in range(N_LAYERS):
        assert cg.layers[l].get_mask_sizes(arg) == c1.layers[l].get_mask_sizes(arg)
    for l in (2, 3):  # the sliding window bounds the long head (window - 1 slots kept)
        assert cg.head_groups(l)[-1][1] == 23


def test_beam_search_grouped_equals_single_tensor():
    model = make_model("llama")
    ids, am, _ = left_padded(2, 40, [0, 9])
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, num_beams=2, pad_token_id=0)
    outs = {}
    for gw in (0.1, 1.0):
        cache = SparseCache(config=model.config, policy=_razor(), group_waste=gw)
        with hf.patched(model, "dense"), torch.no_grad():
            outs[gw] = model.generate(ids, **kw, **{cache_kwarg(model): cache})
        assert (cache.head_groups(0) is not None) == (gw < 1)
    assert torch.equal(outs[0.1], outs[1.0])


def test_uniform_lengths_and_no_policy_stay_one_tensor():
    """No policy, or a policy keeping the same count on every head: plain DynamicCache layers, same tokens."""
    from transformers import DynamicCache

    model = make_model("llama", attn_implementation="sdpa")
    ids, am, _ = left_padded(2, 40, [0, 9])
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw, **{cache_kwarg(model): DynamicCache(config=model.config)})
        plain = SparseCache(config=model.config)
        got = model.generate(ids, **kw, **{cache_kwarg(model): plain})
        stream = {}
        for gw in (0.1, 1.0):
            c = SparseCache(config=model.config, policy=StreamingLLMPolicy(n_sink=2, window=8), group_waste=gw)
            with hf.patched(model, "dense"):
                stream[gw] = (model.generate(ids, **kw, **{cache_kwarg(model): c}), c)
    assert torch.equal(got, ref)
    assert all(type(l).__name__ == "DynamicLayer" for l in plain.layers) and plain.head_groups(0) is None
    assert torch.equal(stream[0.1][0], stream[1.0][0])
    for l in range(N_LAYERS):
        assert stream[0.1][1].head_groups(l) is None and not isinstance(stream[0.1][1].layers[l], GroupedLayer)
        assert stream[0.1][1].nbytes(l) == stream[1.0][1].nbytes(l)


def test_grouped_keys_cannot_be_misused():
    """What update returns for a grouped layer carries no data: any use other than SparseCache.attend raises
    ValueError (an unpatched attention too); attend refuses other tensors and a second call."""
    model = make_model("llama", attn_implementation="sdpa")
    ids, am, pos = left_padded(2, 30, [0, 5])
    cache = SparseCache(config=model.config, policy=_razor())
    with hf.patched(model, "dense"), torch.no_grad():
        model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, **{cache_kwarg(model): cache})
    assert isinstance(cache.layers[0], GroupedLayer)
    B, D = 2, 16
    cache.begin_forward(None)
    k, v = cache.update(torch.randn(B, 2, 1, D), torch.randn(B, 2, 1, D), 0)
    assert isinstance(k, GroupedKV) and k.shape == (B, 2, cache.layers[0].keys.shape[2], D)
    assert k.dtype == torch.float32 and k.device.type == "cpu" and "no data" in repr(k)
    q = torch.randn(B, 4, 1, D)
    for bad in (lambda: k + 1, lambda: k[0], lambda: k.float(), lambda: F.scaled_dot_product_attention(q, k, v),
                lambda: torch.cat([k, k], 2), lambda: k.transpose(1, 2)):
        with pytest.raises(ValueError, match="head groups"):
            bad()
    with pytest.raises(ValueError, match="GroupedKV placeholders"):
        cache.attend(0, q, torch.randn(k.shape), v)
    with pytest.raises(ValueError, match="attention_pad|per-head lengths"):
        cache.attention_pad(0)
    assert cache.needs_attend(0)
    out = cache.attend(0, q, k, v, scale=0.25, backend="reference")
    assert out.shape == (B, 4, 1, D) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="already attended"):
        cache.attend(0, q, k, v)
    for bad in (lambda: cache.crop(-1), lambda: cache.batch_select_indices(torch.tensor([0])),
                lambda: cache.batch_repeat_interleave(2), lambda: cache.reset()):
        with pytest.raises(ValueError, match="head groups"):
            bad()
    with pytest.raises(ValueError, match="assigning keys"):
        cache.layers[0].keys = torch.zeros(1)
    # a model that is not patched gets the placeholders and fails loudly instead of attending to nothing
    ck = cache_kwarg(model)
    am2 = torch.cat([am, torch.ones(B, 2, dtype=am.dtype)], 1)
    with pytest.raises(ValueError, match="head groups"), torch.no_grad():
        model(input_ids=torch.tensor([[3], [4]]), attention_mask=am2, position_ids=pos[:, -1:] + 2, use_cache=True,
              **{ck: cache})


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "0.1", None, float("nan")])
def test_group_waste_must_be_a_number_in_0_1(bad):
    with pytest.raises(ValueError, match="group_waste"):
        SparseCache(policy=StreamingLLMPolicy(), group_waste=bad)
    for ok in (0, 0.0, 0.5, 1):
        assert SparseCache(group_waste=ok).group_waste == float(ok)
