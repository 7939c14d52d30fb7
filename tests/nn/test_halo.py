"""halo layer: blocked local attention with halos against a brute-force float64 reference (odd map
sizes, blocks that are not a power of two), gradients, dense when the halo covers the map,
training, and bad input."""
import pytest
import torch

from sparsattn.nn import get_layer
from tests.nn._i12_checks import compare_with_reference, masked_ref, train_falls


def _halo_mask(H, W, b, h):
    """Brute force: pixel (r, c) sees (r2, c2) when both lie in the (b + 2h)^2 window around the
    b x b block of (r, c), clipped to the map."""
    m = torch.zeros(H * W, H * W, dtype=torch.bool)
    for r in range(H):
        for c in range(W):
            r0, c0 = (r // b) * b - h, (c // b) * b - h
            for r2 in range(max(0, r0), min(H, r0 + b + 2 * h)):
                for c2 in range(max(0, c0), min(W, c0 + b + 2 * h)):
                    m[r * W + c, r2 * W + c2] = True
    return m


def _ref(mask):
    def fn(layer64, x64):
        B, C = x64.shape[0], x64.shape[-1]
        q, k, v = layer64.proj.split(x64.reshape(B, -1, C))
        return layer64.proj.merge(masked_ref(q, k, v, mask)).view(x64.shape)
    return fn


@pytest.mark.parametrize("H,W,b,h", [(9, 11, 4, 2), (8, 8, 4, 1), (7, 10, 3, 3), (5, 6, 2, 0)])
def test_matches_bruteforce_reference_with_grads(H, W, b, h):
    layer = get_layer("halo", 24, 3, block=b, halo=h)
    compare_with_reference(layer, torch.randn(2, H, W, 24), _ref(_halo_mask(H, W, b, h)))
    assert torch.equal(layer.mask(H, W, "cpu"), _halo_mask(H, W, b, h))


def test_triton_interpreter_path_matches_reference():
    layer = get_layer("halo", 16, 2, block=4, halo=1)
    compare_with_reference(layer, torch.randn(1, 5, 4, 16), _ref(_halo_mask(5, 4, 4, 1)), backend="triton", atol=1e-4)


def test_halo_covering_the_map_is_dense():
    H, W = 6, 7
    layer = get_layer("halo", 16, 2, block=4, halo=8)
    compare_with_reference(layer, torch.randn(2, H, W, 16), _ref(torch.ones(H * W, H * W, dtype=torch.bool)))


def test_trains_and_cost():
    first, last = train_falls("halo", (4, 8), steps=40, lr=3e-2, block=4, halo=2)
    assert last < 0.7 * first
    c = get_layer("halo", 16, 2).cost(1024)
    assert abs(c["density"] - float(_halo_mask(32, 32, 8, 3).sum()) / 1024 ** 2) < 1e-9


@pytest.mark.parametrize("kwargs,arg", [
    (dict(dim=30, heads=4), "dim"),
    (dict(block=0), "block"),
    (dict(block=65), "block"),
    (dict(halo=-1), "halo"),
    (dict(halo=1.5), "halo"),
])
def test_invalid_config(kwargs, arg):
    kw = dict(dim=16, heads=2)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        get_layer("halo", kw.pop("dim"), kw.pop("heads"), **kw)


def test_invalid_input():
    layer = get_layer("halo", 16, 2)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 64, 16))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 8, 8, 12))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randint(0, 3, (1, 8, 8, 16)))
