"""baseconv mixer: FFT long convolution vs a direct causal convolution (float64), the gated form
``conv(u) * proj(u) + u``, causality of the short and long paths, training smoke, bf16 on long
sequences, invalid configs."""
import pytest
import torch

from sparsattn.nn import get_layer, layer_class
from sparsattn.nn.mixers.baseconv import causal_fft_conv

from .mixer_helpers import future_leak, train_smoke


def test_fft_conv_equals_direct_convolution():
    u = torch.randn(2, 3, 45, dtype=torch.float64)
    h = torch.randn(3, 45, dtype=torch.float64)
    ref = torch.zeros_like(u)
    for t in range(45):
        for s in range(t + 1):
            ref[..., t] += h[:, t - s] * u[..., s]
    torch.testing.assert_close(causal_fft_conv(u, h), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cfg", [{}, {"kernel_size": 5, "use_act": True}, {"kernel_size": -1},
                                 {"kernel_size": -1, "implicit_long_conv": False, "l_max": 64}])
def test_gated_form_and_causality(cfg):
    m = get_layer("baseconv", 16, 1, **cfg).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    y = m(x)
    c, p = m.conv(x), m.projection(x)
    if cfg.get("use_act"):
        c, p = torch.nn.functional.silu(c), torch.nn.functional.silu(p)
    torch.testing.assert_close(y, c * p + x)
    assert future_leak(m, x, 25) < 1e-12  # exactly 0 for the short path; FFT round-off for the long one
    # the convolution reaches back as far as it should
    with torch.no_grad():
        x2 = x.clone()
        x2[:, 3] += 1.0
        reach = (m.conv(x2) - m.conv(x)).abs().amax(dim=(0, 2)) > 1e-9
    k = cfg.get("kernel_size", 3)
    expected = torch.arange(40) >= 3
    if k > 0:
        expected &= torch.arange(40) < 3 + k
    assert torch.equal(reach, expected)


def test_short_conv_is_depthwise_conv1d():
    m = get_layer("baseconv", 8, 2, kernel_size=3).double()
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    w, b = m.short.weight[:, 0], m.short.bias  # [C, 3]
    ref = torch.stack([sum(w[:, j] * (x[:, t - 2 + j] if t - 2 + j >= 0 else 0) for j in range(3)) + b
                       for t in range(10)], 1)
    torch.testing.assert_close(m.conv(x), ref)


@pytest.mark.parametrize("kernel_size", [3, -1])
def test_training_smoke(kernel_size):
    first, last = train_smoke("baseconv", kernel_size=kernel_size, l_max=24)
    assert last < 0.8 * first, (first, last)


def test_bf16_long_no_nan():
    m = get_layer("baseconv", 32, 1, kernel_size=-1, l_max=4096).bfloat16()
    y = m(torch.randn(1, 4096, 32).bfloat16() * 4)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("cfg,arg", [({"kernel_size": 0}, "kernel_size"), ({"kernel_size": -2}, "kernel_size"),
                                     ({"l_max": 0}, "l_max"), ({"use_act": None}, "use_act"),
                                     ({"causal": False}, "causal"), ({"implicit_long_conv": 1}, "implicit_long_conv")])
def test_invalid_configs(cfg, arg):
    with pytest.raises(ValueError, match=arg):
        get_layer("baseconv", 32, 2, **cfg)
    assert layer_class("baseconv").kind == "mixer"


def test_explicit_filter_length_checked():
    m = get_layer("baseconv", 8, 1, kernel_size=-1, implicit_long_conv=False, l_max=16)
    with pytest.raises(ValueError, match="l_max"):
        m(torch.randn(1, 17, 8))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 17, 9))


def test_per_layer_kernel_sizes():
    """Zoology's list form: layer ``layer_index`` takes ``kernel_size[layer_index]`` (its MQAR
    configuration is [3, -1, 3, -1]: short, long, short, long), and the harness passes the index."""
    short = get_layer("baseconv", 16, 1, kernel_size=[3, -1], layer_index=0)
    long = get_layer("baseconv", 16, 1, kernel_size=[3, -1], layer_index=1)
    assert short.kernel_size == 3 and hasattr(short, "short") and not hasattr(short, "filter")
    assert long.kernel_size == -1 and hasattr(long, "filter")
    x = torch.randn(2, 9, 16)
    ref = get_layer("baseconv", 16, 1, kernel_size=3)
    ref.load_state_dict(short.state_dict())
    torch.testing.assert_close(short(x), ref(x))
    with pytest.raises(ValueError, match="kernel_size"):
        get_layer("baseconv", 16, 1, kernel_size=[3, -1], layer_index=2)
    with pytest.raises(ValueError, match="kernel_size"):
        get_layer("baseconv", 16, 1, kernel_size=[3, 0], layer_index=1)
    with pytest.raises(ValueError, match="layer_index"):
        get_layer("baseconv", 16, 1, kernel_size=[3, -1], layer_index=-1)


def test_mqar_preset_is_zoologys_short_then_long():
    """The MQAR preset through the harness's mixer builder: a short convolution in the first block,
    a long one in the second."""
    from sparsattn.train.layerbench.model import build_mixer

    cfg = layer_class("baseconv").presets["mqar"]
    blocks = [build_mixer("baseconv", 16, 1, cfg, causal=True, index=i, n_layers=2, max_len=32) for i in range(2)]
    assert [b.kernel_size for b in blocks] == [3, -1]
    assert blocks[1].l_max == 32
