"""lightning mixer: parallel form vs step-by-step decode (float64), causality, the kernel the layer
uses vs its quadratic reference, CPU training smoke, bf16 on long sequences, invalid configs."""
import pytest
import torch

from sparsattn.kernels.lightning import lightning_quadratic
from sparsattn.nn import get_layer, layer_class
from sparsattn.nn.mixers.lightning import alibi_slopes

from .mixer_helpers import future_leak, train_smoke


def test_registry_metadata():
    cls = layer_class("lightning")
    assert cls.kind == "mixer" and "2307.14995" in cls.paper and "2401.04658" in cls.paper
    assert cls.causal_modes == (True,)


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]))
    s6 = alibi_slopes(6)  # 4 slopes of H=4, then every other of H=8
    torch.testing.assert_close(s6, torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]))


@pytest.mark.parametrize("gate,norm", [(True, True), (False, False)])
def test_decode_equals_parallel(gate, norm):
    m = get_layer("lightning", 48, 3, gate=gate, norm=norm, block=16).double()
    x = torch.randn(2, 37, 48, dtype=torch.float64)
    y = m(x)
    state, ys = None, []
    for t in range(37):
        yt, state = m.step(x[:, t], state)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-10, rtol=1e-10)
    assert state.shape == (2, 3, 16, 16)
    assert future_leak(m, x, 20) == 0.0


def test_core_is_decayed_linear_attention():
    """The head outputs before norm and gate equal the quadratic masked-decay form."""
    m = get_layer("lightning", 32, 2, gate=False, norm=False, block=16).double()
    x = torch.randn(1, 29, 32, dtype=torch.float64)
    q, k, v, _ = m._qkvu(x)
    ref = lightning_quadratic(q, k, v, m.log_decay)
    o = ref.transpose(1, 2).reshape(1, 29, 32)
    torch.testing.assert_close(m(x), m.out_proj(o), atol=1e-10, rtol=1e-10)


def test_training_smoke():
    first, last = train_smoke("lightning", block=16)
    assert last < 0.8 * first, (first, last)


def test_bf16_long_no_nan():
    m = get_layer("lightning", 64, 4).bfloat16()
    x = torch.randn(1, 4096, 64).bfloat16() * 4
    y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("cfg,arg", [({"causal": False}, "causal"), ({"block": 24}, "block"),
                                     ({"block": 8}, "block"), ({"slope_scale": -1.0}, "slope_scale"),
                                     ({"gate": 1}, "gate"), ({"colour": 1}, "config")])
def test_invalid_configs(cfg, arg):
    with pytest.raises(ValueError, match=arg):
        get_layer("lightning", 32, 2, **cfg)


def test_invalid_inputs():
    m = get_layer("lightning", 32, 2)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="x_t"):
        m.step(torch.randn(2, 3, 32))
    assert 0 < m.cost(4096)["density"] < 0.1
