"""dense: the baseline method selects every causal (or every) block; through the kernel it equals SDPA."""
import pytest
import torch

import sparsattn as sa
from sparsattn.methods import SelectContext, get_method


def test_dense_equals_sdpa_causal_and_not():
    q, k, v = torch.randn(1, 4, 150, 32), torch.randn(1, 2, 150, 32), torch.randn(1, 2, 150, 32)
    m = get_method("dense", block_size=32)
    for causal in (True, False):
        p = m.select(q, k, SelectContext(causal=causal))
        assert p.causal is causal and p.density == pytest.approx(1.0)
        out = sa.attention(q, k, v, p, backend="reference")
        ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                               is_causal=causal)
        assert (out - ref).abs().max() < 1e-5


def test_dense_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        get_method("dense", block_size=48)
