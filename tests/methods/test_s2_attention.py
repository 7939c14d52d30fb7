"""S2-Attention: block mask equals DKernel's rule; heads together cover the context."""
import pytest
import torch

from sparsattn.methods import get_method


def test_block_rule_and_coverage():
    T, bs = 1024, 32
    q = torch.randn(1, 8, T, 16)
    k = torch.randn(1, 4, T, 16)
    p = get_method("s2_attention", block_size=bs, local_blocks=3, vert_stride=4).select(q, k)
    assert p.heads == 4  # GQA groups share the pattern
    sel = p.block_mask()[0]
    n = T // bs
    step = max(1, 4 // 4)
    for h in range(4):
        for i in range(n):
            for j in range(n):
                want = j <= i and (i - j < 3 or (j + h * step) % 4 == 0)
                assert bool(sel[h, i, j]) == want, (h, i, j)
    assert sel.any(0)[torch.ones(n, n, dtype=torch.bool).tril()].all()  # union covers every causal block
    assert abs(p.density - (3 + n / 4 / 2) / (n / 2)) < 0.15


def test_homo_head_defaults_and_errors():
    m = get_method("s2_attention")
    assert (m.block_size, m.local_blocks, m.vert_stride) == (64, 16, 8)
    q = torch.randn(1, 4, 300, 16)
    p = get_method("s2_attention", block_size=32, local_blocks=2, vert_stride=4, homo_head=True).select(q, q)
    assert p.heads == 1
    with pytest.raises(ValueError, match="vert_stride"):
        get_method("s2_attention", vert_stride=0)
    with pytest.raises(ValueError, match="local_blocks"):
        get_method("s2_attention", local_blocks=0)
    with pytest.warns(UserWarning, match="local_blocks"):
        get_method("s2_attention").select(q, q)


def test_chunked_prefill_queries_see_themselves():
    Tq, Tk = 150, 407  # Tk - Tq not a multiple of the block size
    q, k = torch.randn(1, 4, Tq, 16), torch.randn(1, 2, Tk, 16)
    p = get_method("s2_attention", block_size=32, local_blocks=2, vert_stride=4).select(q, k)
    p.validate()
    mask = p.to_dense_mask()
    i = torch.arange(Tq)
    assert mask[..., i, i + Tk - Tq].all()
    j = torch.arange(Tk)
    assert not (mask & (j[None, :] > (i + Tk - Tq)[:, None])).any()


def _dkernel_mask(Hq, Hkv, T, bs, local_blocks, vert_stride, past_len=0, homo_head=False):
    """DKernel's S2 mask re-implemented from its description (dkernel/utils.py get_sparse_attn_mask:
    head_sliding_step = max(1, int(vert_stride / num_heads)) over QUERY heads, the strided rows
    built per KV head h with offset h * step and repeated over the group; block-causal local window
    of the absolute block grid; then token-causal; rows of the last T - past_len queries).
    Returns bool [Hkv, T - past_len, T]."""
    n = -(-T // bs)
    qb = torch.arange(n)[:, None]
    kb = torch.arange(n)[None, :]
    step = max(1, int(vert_stride / (1 if homo_head else Hq)))
    masks = []
    for h in range(1 if homo_head else Hkv):
        strided = (kb + h * step) % vert_stride == 0
        blk = (qb >= kb) & ((qb - kb < local_blocks) | strided)
        tok = blk.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:T, :T] & torch.ones(T, T, dtype=torch.bool).tril()
        masks.append(tok[past_len:])
    return torch.stack(masks)


@pytest.mark.parametrize("Hq,Hkv,stride", [(8, 2, 8), (8, 8, 8), (32, 8, 8), (8, 2, 4), (4, 1, 16)])
def test_equals_dkernel_rotation_over_query_heads(Hq, Hkv, stride):
    T, bs, local = 640, 32, 3
    q, k = torch.randn(1, Hq, T, 16), torch.randn(1, Hkv, T, 16)
    p = get_method("s2_attention", block_size=bs, local_blocks=local, vert_stride=stride).select(q, k)
    assert p.heads == Hkv
    assert torch.equal(p.to_dense_mask()[0], _dkernel_mask(Hq, Hkv, T, bs, local, stride))
    # chunked prefill with a block-aligned past: DKernel's trimmed rows
    past = 4 * bs
    p = get_method("s2_attention", block_size=bs, local_blocks=local, vert_stride=stride).select(q[:, :, past:], k)
    assert torch.equal(p.to_dense_mask()[0], _dkernel_mask(Hq, Hkv, T, bs, local, stride, past_len=past))
    p = get_method("s2_attention", block_size=bs, local_blocks=local, vert_stride=stride, homo_head=True).select(q, k)
    assert torch.equal(p.to_dense_mask()[0], _dkernel_mask(Hq, Hkv, T, bs, local, stride, homo_head=True))


def test_gqa_8_2_stride_8_offsets_and_kv_heads_option():
    q, k = torch.randn(1, 8, 512, 16), torch.randn(1, 2, 512, 16)
    m = get_method("s2_attention", block_size=32, local_blocks=2, vert_stride=8)
    assert m.head_offsets(8, 2) == [0, 1]  # DKernel: step max(1, 8 // 8 query heads) = 1
    kv = get_method("s2_attention", block_size=32, local_blocks=2, vert_stride=8, head_rotation="kv_heads")
    assert kv.head_offsets(8, 2) == [0, 4]  # evenly spread KV-head shards (the option)
    sel = kv.select(q, k).block_mask()[0]  # [2, 16, 16]
    n = 16
    for h, off in enumerate((0, 4)):
        for i in range(n):
            for j in range(n):
                assert bool(sel[h, i, j]) == (j <= i and (i - j < 2 or (j + off) % 8 == 0)), (h, i, j)
    with pytest.raises(ValueError, match="head_rotation"):
        get_method("s2_attention", head_rotation="query")


def test_unaligned_chunk_is_a_superset_of_dkernel_by_at_most_one_block_per_row():
    T, bs, past = 640, 32, 45
    q, k = torch.randn(1, 8, T - past, 16), torch.randn(1, 2, T, 16)
    mask = get_method("s2_attention", block_size=bs, local_blocks=3, vert_stride=8).select(q, k).to_dense_mask()[0]
    ref = _dkernel_mask(8, 2, T, bs, 3, 8, past_len=past)
    assert not (ref & ~mask).any()
    assert int((mask & ~ref).sum(-1).max()) <= bs
