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
