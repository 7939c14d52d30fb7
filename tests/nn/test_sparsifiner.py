"""sparsifiner layer: the predicted top-k mask (budget per row, detached), sparse attention on it
against a float64 reference with gradients, keep_rate=1 equals dense, the causal form has no leak,
the distillation loss trains the predictor, training, and bad input."""
import math

import pytest
import torch

from sparsattn.nn import get_layer
from sparsattn.nn.base import attention_backend
from tests.nn._i12_checks import compare_with_reference, future_leak, masked_ref, train_falls


def _masked_with_prediction(layer64, x64):
    B, C = x64.shape[0], x64.shape[-1]
    q, k, v = layer64.proj.split(x64.reshape(B, -1, C))
    mask, _ = layer64.predict(q, k)
    return layer64.proj.merge(masked_ref(q, k, v, mask)).view(x64.shape)


@pytest.mark.parametrize("causal,T", [(False, 37), (True, 41)])
def test_sparse_attention_on_predicted_mask_with_grads(causal, T):
    layer = get_layer("sparsifiner", 24, 3, keep_rate=0.3, max_len=48, causal=causal)
    x = torch.randn(2, T, 24)
    compare_with_reference(layer, x, _masked_with_prediction)
    q, k, _ = layer.proj.split(x)
    mask, approx = layer.predict(q, k)
    kb = math.ceil(0.3 * T)
    rows = mask.sum(-1)
    if causal:
        assert torch.equal(rows, torch.clamp(torch.arange(1, T + 1), max=kb).expand_as(rows))
        assert not bool(mask.triu(1).any())
    else:
        assert bool((rows == kb).all())
    assert not mask.requires_grad and approx.requires_grad


def test_triton_interpreter_path():
    layer = get_layer("sparsifiner", 16, 2, keep_rate=0.25, max_len=32, causal=True)
    compare_with_reference(layer, torch.randn(1, 20, 16), _masked_with_prediction, backend="triton", atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_keep_everything_is_dense(causal):
    layer = get_layer("sparsifiner", 16, 2, keep_rate=1.0, max_len=32, causal=causal)

    def dense(layer64, x64):
        q, k, v = layer64.proj.split(x64)
        m = torch.ones(x64.shape[1], x64.shape[1], dtype=torch.bool)
        return layer64.proj.merge(masked_ref(q, k, v, m.tril() if causal else m))

    compare_with_reference(layer, torch.randn(2, 27, 16), dense)


def test_causal_has_no_leak_and_2d_input():
    layer = get_layer("sparsifiner", 16, 2, max_len=32, causal=True)
    assert future_leak(layer, torch.randn(2, 30, 16), 12) == 0.0
    y = get_layer("sparsifiner", 16, 2, max_len=64)(torch.randn(2, 6, 7, 16))
    assert y.shape == (2, 6, 7, 16)


def test_distillation_trains_the_predictor():
    torch.manual_seed(0)
    layer = get_layer("sparsifiner", 16, 2, max_len=32, reduce_n=2, distill_rows=0)
    pred = [layer.proj_c_q, layer.proj_c_k]
    opt = torch.optim.Adam([p for m in pred for p in m.parameters()] + [layer.proj_n, layer.proj_back_n], lr=2e-2)
    x = torch.randn(4, 32, 16)
    layer.train()
    losses = []
    with attention_backend("reference"):
        for _ in range(40):
            layer(x)
            loss = layer.extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    layer.eval()
    with attention_backend("reference"):
        layer(x)
    assert layer.extra_loss() is None


def test_trains_and_cost():
    first, last = train_falls("sparsifiner", (24,), max_len=24, keep_rate=0.5, causal=True)
    assert last < 0.7 * first
    c = get_layer("sparsifiner", 16, 2).cost(1024)
    assert abs(c["density"] - 0.25) < 1e-9


@pytest.mark.parametrize("kwargs,arg", [
    (dict(dim=30, heads=4), "dim"),
    (dict(keep_rate=0.0), "keep_rate"),
    (dict(keep_rate=1.5), "keep_rate"),
    (dict(reduce_c=9), "reduce_c"),
    (dict(reduce_n=0), "reduce_n"),
    (dict(basis_topk=0), "basis_topk"),
    (dict(max_len=4, reduce_n=6), "reduce_n"),
    (dict(distill_weight=-1.0), "distill_weight"),
    (dict(causal=1), "causal"),
])
def test_invalid_config(kwargs, arg):
    kw = dict(dim=16, heads=2)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        get_layer("sparsifiner", kw.pop("dim"), kw.pop("heads"), **kw)


def test_invalid_input():
    layer = get_layer("sparsifiner", 16, 2, max_len=32)
    with pytest.raises(ValueError, match="max_len"):
        layer(torch.randn(1, 40, 16))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 8, 12))
