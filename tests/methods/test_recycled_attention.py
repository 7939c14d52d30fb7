import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext

from _sparse_decode_utils import assert_equals_dense, needle_case, selects


def test_stride_schedule_recycles_top_k_and_new_tokens():
    q, k, v, pos = needle_case()
    m = get_method("recycled_attention", budget=64, stride=4)
    ctx = SelectContext(layer=7)
    fulls = []
    for step in range(9):
        kl = torch.tensor([1900 + step, 1900 + step])
        ctx.extras["kv_lens"] = kl
        p = m.select(q, k, ctx)
        fulls.append(ctx.extras["full_step"])
        if not ctx.extras["full_step"]:
            # recycled top-K (with the needle) + the tokens appended since the last full step
            assert all(selects(p, b, h, pos[b]) for b in range(2) for h in range(2))
            last_full = max(i for i in range(step + 1) if fulls[i])
            new = set(range(1900 + last_full, 1900 + step))
            got = set(p.to_token_mask()[0, 0].nonzero().flatten().tolist())
            assert new <= got and len(got) <= 64 + len(new)
        else:
            assert int(p.counts.min()) == 1900 + step
    assert fulls == [True, False, False, False, True, False, False, False, True]


def test_similarity_schedule():
    q, k, v, _ = needle_case(T=500)
    m = get_method("recycled_attention", budget=32, schedule="similarity", check_every=2, similarity=0.9)
    ctx = SelectContext(layer=0)
    flags = []
    for step, qq in enumerate([q, q, q, q, -q, -q]):
        m.select(qq, k, ctx)
        flags.append(ctx.extras["full_step"])
    # check at every 2nd partial step: same query -> no refresh; opposite query -> refresh
    assert flags == [True, False, False, False, True, False]


def test_full_budget_equals_dense():
    q, k, v, _ = needle_case(T=300)
    m = get_method("recycled_attention", budget=300, stride=3)
    ctx = SelectContext(layer=0)
    for step in range(4):
        kl = torch.tensor([290 + step, 200 + step])
        ctx.extras["kv_lens"] = kl
        assert_equals_dense(q, k, v, m.select(q, k, ctx), kl)
    with pytest.raises(ValueError, match="pool_kernel"):
        get_method("recycled_attention", pool_kernel=4)
