"""biformer layer: bi-level routing against an independent float64 reference (2-D with cut border
regions, 1-D non-causal, 1-D causal token routing), gradients, dense when topk covers every
region (with the LCE convolution), causality of the 1-D causal form, training, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from sparsattn.nn import get_layer
from tests.nn._i12_checks import compare_with_reference, future_leak, masked_ref, train_falls


def _lepe(layer64, v, shape):
    """The LCE term: depth-wise conv of V (causal 1-D: left padding)."""
    B, h, N, d = v.shape
    vm = v.transpose(1, 2).reshape(B, N, h * d)
    conv = layer64.lepe
    if len(shape) == 2:
        return F.conv2d(vm.transpose(1, 2).reshape(B, -1, *shape), conv.weight, conv.bias,
                        padding=conv.kernel_size[0] // 2, groups=conv.groups).flatten(2).transpose(1, 2)
    vin = vm.transpose(1, 2)
    if layer64.causal:
        return F.conv1d(F.pad(vin, (conv.kernel_size[0] - 1, 0)), conv.weight, conv.bias, groups=conv.groups).transpose(1, 2)
    return F.conv1d(vin, conv.weight, conv.bias, padding=conv.kernel_size[0] // 2, groups=conv.groups).transpose(1, 2)


def _region_mask(qf, kf, region, nR, topk, scale):
    """Region-level routing by loops over regions: [B, N, N] mask."""
    B, N, _ = qf.shape
    mask = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        qr = torch.stack([qf[b, region == r].mean(0) for r in range(nR)])
        kr = torch.stack([kf[b, region == r].mean(0) for r in range(nR)])
        top = ((qr * scale) @ kr.t()).topk(min(topk, nR), -1).indices
        for i in range(N):
            mask[b, i] = torch.isin(region, top[region[i]])
    return mask


def _causal_token_mask(qf, kf, R, topk, scale):
    B, T, _ = qf.shape
    reg = torch.arange(T) // R
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            r = int(reg[t])
            if r:
                kr = torch.stack([kf[b, reg == j].mean(0) for j in range(r)])
                chosen = ((qf[b, t] * scale) @ kr.t()).topk(min(topk, r)).indices
                mask[b, t] = torch.isin(reg, chosen)
            mask[b, t] |= (reg == r) & (torch.arange(T) <= t)
    return mask


def _reference(layer64, x64):
    shape = tuple(x64.shape[1:-1])
    B, C = x64.shape[0], x64.shape[-1]
    q, k, v = layer64.proj.split(x64.reshape(B, -1, C))
    N = q.shape[2]
    qf = q.transpose(1, 2).reshape(B, N, -1)
    kf = k.transpose(1, 2).reshape(B, N, -1)
    if layer64.causal:
        R = layer64.region_size or math.ceil(N / layer64.n_win)
        mask = _causal_token_mask(qf, kf, R, layer64.topk, layer64.scale)
    else:
        H, W = shape if len(shape) == 2 else (1, shape[0])
        rh, rw = layer64._regions(H, W)
        rr, cc = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        nRw = math.ceil(W / rw)
        region = ((rr // rh) * nRw + cc // rw).reshape(-1)
        mask = _region_mask(qf, kf, region, int(region.max()) + 1, layer64.topk, layer64.scale)
    o = masked_ref(q, k, v, mask[:, None], scale=layer64.scale).transpose(1, 2).reshape(B, N, C)
    if layer64.lepe is not None:
        o = o + _lepe(layer64, v, shape)
    return layer64.proj.out(o).view(x64.shape)


@pytest.mark.parametrize("shape,kw", [
    ((9, 11), dict(n_win=3, topk=2)),          # 3x4 regions (cut at the border), slots padded to 16
    ((8, 8), dict(region_size=4, topk=1)),
    ((37,), dict(spatial_dims=1, region_size=8, topk=2)),
    ((37,), dict(spatial_dims=1, region_size=8, topk=2, causal=True)),
    ((30,), dict(spatial_dims=1, region_size=5, topk=3, causal=True, side_dwconv=3)),
])
def test_matches_reference_with_grads(shape, kw):
    kw.setdefault("side_dwconv", 0)
    layer = get_layer("biformer", 24, 3, **kw)
    compare_with_reference(layer, torch.randn(2, *shape, 24), _reference)


def test_triton_interpreter_path_matches_reference():
    layer = get_layer("biformer", 16, 2, n_win=2, topk=2, side_dwconv=0)
    compare_with_reference(layer, torch.randn(1, 6, 5, 16), _reference, backend="triton", atol=1e-4)


@pytest.mark.parametrize("shape,kw", [((7, 9), dict(n_win=3)), ((29,), dict(spatial_dims=1, n_win=4)),
                                      ((29,), dict(spatial_dims=1, region_size=6, causal=True))])
def test_topk_all_regions_is_dense_plus_lce(shape, kw):
    layer = get_layer("biformer", 16, 2, topk=100, side_dwconv=3, **kw)

    def dense(layer64, x64):
        B, C = x64.shape[0], x64.shape[-1]
        q, k, v = layer64.proj.split(x64.reshape(B, -1, C))
        N = q.shape[2]
        m = torch.ones(N, N, dtype=torch.bool)
        m = m.tril() if layer64.causal else m
        o = masked_ref(q, k, v, m, scale=layer64.scale).transpose(1, 2).reshape(B, N, C) + _lepe(layer64, v, shape)
        return layer64.proj.out(o).view(x64.shape)

    compare_with_reference(layer, torch.randn(2, *shape, 16), dense)


def test_causal_1d_has_no_leak_and_trains():
    layer = get_layer("biformer", 16, 2, spatial_dims=1, region_size=4, topk=1, causal=True)
    x = torch.randn(2, 30, 16)
    for t in (5, 13, 22):  # inside regions: later tokens of the region must not steer earlier ones
        assert future_leak(layer, x, t) == 0.0
    first, last = train_falls("biformer", (16,), spatial_dims=1, region_size=4, topk=2, causal=True)
    assert last < 0.7 * first
    first, last = train_falls("biformer", (4, 8), n_win=2, topk=2)
    assert last < 0.7 * first


def test_layout_and_cost():
    assert get_layer("biformer", 16, 2).layout == "2d"
    assert get_layer("biformer", 16, 2, spatial_dims=1).layout == "1d"
    c = get_layer("biformer", 16, 2, n_win=8, topk=16).cost(1024)
    assert abs(c["density"] - 0.25) < 1e-9


@pytest.mark.parametrize("kwargs,arg", [
    (dict(dim=30, heads=4), "dim"),
    (dict(n_win=0), "n_win"),
    (dict(topk=0), "topk"),
    (dict(region_size=0), "region_size"),
    (dict(qk_dim=15), "qk_dim"),
    (dict(side_dwconv=4), "side_dwconv"),
    (dict(spatial_dims=3), "spatial_dims"),
    (dict(causal=True), "causal"),  # causal only in 1-D
    (dict(qk_scale=-1.0), "qk_scale"),
])
def test_invalid_config(kwargs, arg):
    kw = dict(dim=16, heads=2)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        get_layer("biformer", kw.pop("dim"), kw.pop("heads"), **kw)


def test_invalid_input():
    with pytest.raises(ValueError, match="x"):
        get_layer("biformer", 16, 2)(torch.randn(1, 64, 16))
    with pytest.raises(ValueError, match="x"):
        get_layer("biformer", 16, 2, spatial_dims=1)(torch.randn(1, 8, 8, 16))
