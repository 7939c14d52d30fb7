"""Registry-wide contract of sparsattn.nn layers: every registered layer, by registry (no names).

Shape in == shape out, no NaN, causal layers do not read the future (in training and eval mode),
config() round-trips through get_layer and the state dict, cost(T) is well formed.
"""
import copy
import math

import pytest
import torch

from sparsattn.nn import get_layer, hyper_parameters, layer_class, list_layers
from sparsattn.nn.base import attention_backend

DIM, HEADS, B, T = 32, 2, 2, 40
GRIDS_2D = [(16, 16), (14, 14), (8, 8), (12, 12), (28, 28), (32, 32)]


def _build(name, **cfg):
    """The layer with its defaults (plus ``cfg``)."""
    return get_layer(name, DIM, HEADS, **cfg)


def _causal(name):
    """The layer built causal (its default when that is causal, else ``causal=True``), or a skip
    when the layer has no causal 1-D form."""
    cls = layer_class(name)
    if cls.layout != "1d":
        pytest.skip("2-D layer")
    # prefix layers (JRT-RNN's encoder region) read their prefix both ways: keep it short, the
    # probe below checks the tokens after it
    cfg = {"prefix_len": 8} if "prefix_len" in hyper_parameters(name) else {}
    if "causal" not in hyper_parameters(name):
        if cls.causal_modes == (True,):
            return _build(name, **cfg)
        pytest.skip("no causal switch")
    try:
        return _build(name, causal=True, **cfg)
    except ValueError as e:
        pytest.skip(f"no causal form with the other defaults: {e}")


def _input(layer, name):
    """x for the layer: [B, T, DIM] (1-D) or the first 2-D grid the layer accepts."""
    if layer_class(name).layout == "1d":
        return torch.randn(B, T, DIM)
    errors = []
    for h, w in GRIDS_2D:
        x = torch.randn(B, h, w, DIM)
        try:
            with torch.no_grad():
                layer(x)
            return x
        except ValueError as e:  # this grid does not fit the layer's regions / blocks
            errors.append(f"{h}x{w}: {e}")
    pytest.fail(f"{name}: no 2-D grid accepted: {errors}")


@pytest.fixture(autouse=True)
def _reference_backend():
    with attention_backend("reference"):
        yield


@pytest.mark.parametrize("name", list_layers())
def test_shape_finite_and_backward(name):
    layer = _build(name)
    x = _input(layer, name).requires_grad_(True)
    y = layer(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    loss = y.square().mean()
    extra = layer.extra_loss()
    if extra is not None:
        assert torch.isfinite(extra)
        loss = loss + extra
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters() if p.requires_grad)
    layer.eval()
    with torch.no_grad():
        ye = layer(x)
    assert ye.shape == x.shape and torch.isfinite(ye).all()


def _causal_params():
    """Causal layers (the caveat, if any, is read from the built instance in the test)."""
    return [pytest.param(n, id=n) for n in list_layers() if True in layer_class(n).causal_modes]


def _leak(layer, mode):
    """Largest change of outputs up to t = 17 when only the tokens after t change."""
    layer.train(mode == "train")
    t = 17
    x = torch.randn(B, T, DIM)
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn(B, T - t - 1, DIM) * 3
    twin = copy.deepcopy(layer)  # same state for both calls (layers with running statistics)
    torch.manual_seed(7)
    with torch.no_grad():
        y1 = layer(x)
    torch.manual_seed(7)
    with torch.no_grad():
        y2 = twin(x2)
    return float((y1[:, :t + 1] - y2[:, :t + 1]).abs().max()), y1[:, :t + 1]


@pytest.mark.parametrize("name", _causal_params())
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_causal_layers_do_not_read_the_future(name, mode):
    """A causal layer's outputs up to t ignore later tokens; a layer whose instance declares a causal
    caveat must show the leak (so the caveat is removed when it stops leaking)."""
    layer = _causal(name)
    leak, y = _leak(layer, mode)
    tol = 1e-5 + 1e-4 * float(y.abs().max())
    if layer.caveat():
        assert leak > tol, f"{name} ({mode}) declares a causal caveat but did not leak: remove the caveat"
        pytest.xfail(layer.caveat())
    assert leak <= tol, f"{name} ({mode}): outputs up to 17 changed by {leak:.2e}"


def test_balanced_routing_causal_form_leaks_and_says_so():
    """The one configuration with a declared caveat (the paper's balanced routing, causal): it leaks."""
    layer = _build("routing", causal=True, routing="balanced")
    assert layer.caveat()
    leak, y = _leak(layer, "eval")
    assert leak > 1e-3


@pytest.mark.parametrize("name", list_layers())
def test_config_round_trip(name):
    layer = _build(name)
    cfg = layer.config()
    assert cfg["dim"] == DIM and cfg["heads"] == HEADS
    rest = {k: v for k, v in cfg.items() if k not in ("dim", "heads")}
    assert set(rest) <= set(hyper_parameters(name)) or any(
        p.kind == p.VAR_KEYWORD for p in __import__("inspect").signature(layer_class(name).__init__).parameters.values())
    again = get_layer(name, cfg["dim"], cfg["heads"], **rest)
    assert again.config() == cfg
    again.load_state_dict(layer.state_dict())
    layer.eval()
    again.eval()
    x = _input(layer, name)
    torch.manual_seed(3)
    with torch.no_grad():
        a = layer(x)
    torch.manual_seed(3)
    with torch.no_grad():
        b = again(x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", list_layers())
def test_cost_is_well_formed(name):
    layer = _build(name)
    n = 256
    c = layer.cost(n)
    assert isinstance(c, dict) and "density" in c and "flops" in c
    # sparse layers: computed pairs / causal pairs; mixers and approximations may report their
    # compute relative to dense attention, which can pass 1 at short lengths
    hi = 1.0 + 1e-9 if layer_class(name).kind == "sparse" else math.inf
    assert c["density"] is None or 0.0 <= c["density"] <= hi
    assert c["flops"] is None or (math.isfinite(c["flops"]) and c["flops"] >= 0)


@pytest.mark.parametrize("name", list_layers())
def test_bad_dim_and_heads_name_the_argument(name):
    with pytest.raises(ValueError, match="dim"):
        get_layer(name, 30, 4)
    with pytest.raises(ValueError, match="heads"):
        get_layer(name, 32, 0)
