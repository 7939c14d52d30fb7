"""MASFormer: full layers dense, others delegate to any registered method."""
import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext


def test_dispatch_by_layer_and_composition():
    q = torch.randn(1, 4, 300, 16)
    k = torch.randn(1, 2, 300, 16)
    m = get_method("masformer", full_layers=(0, 5), inner="s2_attention",
                   inner_config={"block_size": 32, "local_blocks": 2, "vert_stride": 4})
    full = m.select(q, k, SelectContext(layer=5))
    assert abs(full.density - 1.0) < 1e-12
    sparse = m.select(q, k, SelectContext(layer=1))
    ref = get_method("s2_attention", block_size=32, local_blocks=2, vert_stride=4).select(q, k)
    assert torch.equal(sparse.to_dense_mask(), ref.to_dense_mask())
    assert sparse.density < 0.9
    # an instance as inner
    inner = get_method("a_shape", n_init=4, n_local=32, block_size=32)
    m2 = get_method("masformer", full_layers=(2,), inner=inner)
    assert torch.equal(m2.select(q, k, SelectContext(layer=0)).to_dense_mask(), inner.select(q, k).to_dense_mask())
    assert m2.config()["inner"] == "a_shape"


def test_errors():
    q = torch.randn(1, 2, 100, 16)
    with pytest.raises(ValueError, match="ctx.layer"):
        get_method("masformer", full_layers=(0,)).select(q, q)
    with pytest.raises(ValueError, match="full_layers"):
        get_method("masformer", full_layers=3)
    with pytest.raises(ValueError, match="method"):
        get_method("masformer", inner="no_such_method")
    with pytest.raises(ValueError, match="n_local"):
        get_method("masformer", inner="a_shape", inner_config={"n_local": 0})
    with pytest.raises(ValueError, match="inner"):
        get_method("masformer", inner="masformer")
