"""a_shape: element-exact sink + window mask; clamping and validation."""
import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext


@pytest.mark.parametrize("Tq,Tk", [(300, 300), (100, 300)])
def test_mask_is_sink_plus_window(Tq, Tk):
    q, k = torch.randn(1, 4, Tq, 16), torch.randn(1, 2, Tk, 16)
    p = get_method("a_shape", n_init=13, n_local=50, block_size=32).select(q, k)
    m = p.to_dense_mask()[0, 0]
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    ref = (j <= i) & ((j < 13) | (i - j < 50))
    assert torch.equal(m, ref)


def test_defaults_and_clamp_and_errors():
    m = get_method("a_shape")
    assert (m.n_init, m.n_local, m.block_size) == (128, 3968, 64)
    q = torch.randn(1, 2, 200, 16)
    with pytest.warns(UserWarning, match="n_init"):
        p = m.select(q, q)
    assert abs(p.density - 1.0) < 1e-12
    with pytest.raises(ValueError, match="n_local"):
        get_method("a_shape", n_local=0)
    with pytest.raises(ValueError, match="ctx.causal"):
        get_method("a_shape", n_local=10).select(q, q, SelectContext(causal=False))
    with pytest.raises(ValueError, match="k heads"):
        get_method("a_shape", n_local=10).select(q, torch.randn(1, 3, 200, 16))
