import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext

from _sparse_decode_utils import assert_equals_dense, needle_case, selects


def test_selection_layers_and_reuse_across_layers():
    q, k, v, pos = needle_case()
    m = get_method("tidal_decode", token_budget=64, sparse_layer_start=2, correction_layer=5)
    state = {}
    gen = torch.Generator().manual_seed(3)
    p0 = m.select(q, k, SelectContext(layer=0, state=state))
    assert int(p0.counts.min()) == 2048  # dense layers
    p2 = m.select(q, k, SelectContext(layer=2, state=state))
    assert int(p2.counts.max()) == 64
    assert all(selects(p2, b, h, pos[b]) for b in range(2) for h in range(2))
    # layer 3 has other keys (no needle) but reuses the positions of layer 2
    k3 = torch.randn(k.shape, generator=gen)
    p3 = m.select(torch.randn(q.shape, generator=gen), k3, SelectContext(layer=3, state=state))
    assert torch.equal(p3.to_unit_mask(), p2.to_unit_mask())
    # the correction layer re-selects: its needle is elsewhere
    k5 = k3.clone()
    k5[:, :, 100] = 6 * q.view(2, 2, 4, 64).mean(2)
    p5 = m.select(q, k5, SelectContext(layer=5, state=state))
    assert all(selects(p5, b, h, 100) for b in range(2) for h in range(2))
    p6 = m.select(q, k3, SelectContext(layer=6, state=state))
    assert torch.equal(p6.to_unit_mask(), p5.to_unit_mask())


def test_state_is_required_and_per_step():
    q, k, v, _ = needle_case(T=200)
    m = get_method("tidal_decode", token_budget=32)
    with pytest.raises(ValueError, match="tidal_decode"):
        m.select(q, k, SelectContext(layer=4))
    state = {}
    m.select(q, k, SelectContext(layer=2, state=state, extras={"kv_lens": torch.tensor([150, 150])}))
    with pytest.raises(ValueError, match="tidal_decode"):  # the next step must select again
        m.select(q, k, SelectContext(layer=4, state=state, extras={"kv_lens": torch.tensor([151, 151])}))
    with pytest.raises(ValueError, match="ctx.layer"):
        m.select(q, k)


def test_full_budget_equals_dense():
    q, k, v, _ = needle_case(T=257)
    m = get_method("tidal_decode", token_budget=1000)
    state = {}
    kl = torch.tensor([257, 99])
    for layer in range(4):
        p = m.select(q, k, SelectContext(layer=layer, state=state, extras={"kv_lens": kl}))
        assert_equals_dense(q, k, v, p, kl)
    with pytest.raises(ValueError, match="correction_layer"):
        get_method("tidal_decode", sparse_layer_start=3, correction_layer=3)
