"""neighborhood layer: NATTEN semantics against a brute-force float64 reference (1-D/2-D/3-D,
dilation, causal), outputs and gradients, the Triton interpreter path, dense when the kernel
covers everything, training, causality, and bad input."""
import itertools

import pytest
import torch

from sparsattn.nn import get_layer
from tests.nn._i12_checks import compare_with_reference, future_leak, masked_ref, train_falls


def _axis_neighbours(i, n, k, d, causal):
    """Brute force: the positions query i sees along one axis (NATTEN: clamped window, dilation
    groups, causal = the latest k dilated positions up to i)."""
    group = [p for p in range(n) if p % d == i % d]
    pos = group.index(i)
    if causal:
        return set(group[max(0, pos - k + 1): pos + 1])
    start = min(max(pos - k // 2, 0), len(group) - k)
    return set(group[start: start + k])


def _na_mask(shape, k, d, causal):
    pts = list(itertools.product(*[range(n) for n in shape]))
    m = torch.zeros(len(pts), len(pts), dtype=torch.bool)
    for a, pa in enumerate(pts):
        ok = [_axis_neighbours(pa[ax], shape[ax], k[ax], d[ax], causal[ax]) for ax in range(len(shape))]
        for b, pb in enumerate(pts):
            m[a, b] = all(pb[ax] in ok[ax] for ax in range(len(shape)))
    return m


def _ref(mask):
    def fn(layer64, x64):
        B, C = x64.shape[0], x64.shape[-1]
        q, k, v = layer64.proj.split(x64.reshape(B, -1, C))
        return layer64.proj.merge(masked_ref(q, k, v, mask)).view(x64.shape)
    return fn


@pytest.mark.parametrize("shape,k,d,causal", [
    ((21,), (5,), (2,), (False,)),
    ((19,), (4,), (3,), (True,)),
    ((7, 9), (3, 5), (2, 1), (False, False)),
    ((6, 5), (3, 2), (1, 2), (True, False)),
    ((3, 4, 5), (3, 3, 3), (1, 1, 1), (False, True, False)),
])
def test_matches_bruteforce_reference_with_grads(shape, k, d, causal):
    nd = len(shape)
    layer = get_layer("neighborhood", 24, 3, kernel_size=list(k), dilation=list(d), causal=list(causal),
                      spatial_dims=nd, block_size=16)
    x = torch.randn(2, *shape, 24)
    compare_with_reference(layer, x, _ref(_na_mask(shape, k, d, causal)))


def test_triton_interpreter_path_matches_reference():
    layer = get_layer("neighborhood", 16, 2, kernel_size=3, dilation=2, block_size=16)
    x = torch.randn(1, 7, 7, 16)
    compare_with_reference(layer, x, _ref(_na_mask((7, 7), (3, 3), (2, 2), (False, False))), backend="triton",
                           atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_covering_everything_is_dense(causal):
    T = 23
    layer = get_layer("neighborhood", 16, 2, kernel_size=T, causal=causal, spatial_dims=1, block_size=16)
    mask = torch.ones(T, T, dtype=torch.bool)
    compare_with_reference(layer, torch.randn(2, T, 16), _ref(mask.tril() if causal else mask))


def test_trains_and_causal_has_no_leak():
    first, last = train_falls("neighborhood", (16,), spatial_dims=1, kernel_size=5, causal=True, block_size=16)
    assert last < 0.7 * first
    layer = get_layer("neighborhood", 16, 2, kernel_size=5, causal=True, spatial_dims=1, block_size=16)
    assert future_leak(layer, torch.randn(2, 30, 16), 17) == 0.0
    assert get_layer("neighborhood", 16, 2, spatial_dims=1).layout == "1d"
    assert get_layer("neighborhood", 16, 2).layout == "2d"


def test_cost_reports_pattern_density():
    c = get_layer("neighborhood", 16, 2, kernel_size=3).cost(64)
    assert abs(c["density"] - float(_na_mask((8, 8), (3, 3), (1, 1), (False, False)).sum()) / 64 ** 2) < 1e-9


@pytest.mark.parametrize("kwargs,arg", [
    (dict(dim=30, heads=4), "dim"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=[3, 3, 3]), "kernel_size"),
    (dict(dilation=1.5), "dilation"),
    (dict(causal="yes"), "causal"),
    (dict(spatial_dims=4), "spatial_dims"),
    (dict(block_size=48), "block_size"),
])
def test_invalid_config(kwargs, arg):
    kw = dict(dim=16, heads=2)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        get_layer("neighborhood", kw.pop("dim"), kw.pop("heads"), **kw)


def test_invalid_input():
    layer = get_layer("neighborhood", 16, 2, kernel_size=5)
    with pytest.raises(ValueError, match="kernel_size"):
        layer(torch.randn(1, 4, 8, 16))  # kernel 5 > 4 rows
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 8, 16))  # 1-D input to a 2-D layer
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 8, 8, 15))
