"""merge_heads with a part that has column lists next to a multi-head part without them (issue 21:
MInference plans mixing vertical-slash and block-sparse heads raised IndexError)."""
import torch

from sparsattn.methods import get_method
from sparsattn.patterns.algebra import merge_heads


def test_merge_heads_columns_next_to_multihead_part_without_columns():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g)
    vs = get_method("vertical_slash", v_size=20, s_size=16, last_q=16, n_sink=4, n_local=8, block_size=32).select(
        q[:, :2], k[:, :1])
    bs = get_method("block_sparse", top_k=3, block_size=32).select(q[:, 2:], k[:, 1:])
    assert vs.columns is not None and bs.columns is None and bs.heads == 2
    m = merge_heads([([0, 1], vs), ([2, 3], bs)], 4)
    d = m.to_dense_mask()
    assert torch.equal(d[0, :2], vs.to_dense_mask()[0]) and torch.equal(d[0, 2:], bs.to_dense_mask()[0])
