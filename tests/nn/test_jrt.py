"""jrt: JRT-RNN prefix linear attention vs its quadratic definition (float64), non-causal prefix /
causal rest, decode after prefill equals the parallel form, lse merging, JRT-Prompt transform,
training smoke, bf16 on long sequences, invalid configs."""
import pytest
import torch

from sparsattn.eval.mqar import mqar
from sparsattn.nn import get_layer, layer_class
from sparsattn.kernels.merge import merge_lse
from sparsattn.nn.mixers.jrt import choose_form, jrt_prompt, prefix_linear_attention, taylor_features

from .mixer_helpers import train_smoke


def test_taylor_features_kernel():
    q, k = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    z = (q * k).sum(-1) / 4.0
    torch.testing.assert_close((taylor_features(q) * taylor_features(k)).sum(-1), 1 + z + z * z / 2)
    assert taylor_features(q).shape == (5, 1 + 16 + 256)


@pytest.mark.parametrize("form", ["quadratic", "chunked"])
@pytest.mark.parametrize("T,M", [(23, 9), (30, 0), (12, 40), (70, 64)])
def test_prefix_linear_attention_definition(T, M, form):
    g = torch.Generator().manual_seed(T)
    q, k, ke = (torch.randn(2, 2, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
    v, ve = (torch.randn(2, 2, T, 5, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse = prefix_linear_attention(q, k, v, ke, ve, M, form=form)
    fq, fk, fke = taylor_features(q), taylor_features(k), taylor_features(ke)
    Me = min(M, T)
    A = (fq @ fk.transpose(-1, -2)) * torch.ones(T, T, dtype=torch.float64).tril()
    Ae = fq @ fke[:, :, :Me].transpose(-1, -2)
    num, den = A @ v + Ae @ ve[:, :, :Me], A.sum(-1) + Ae.sum(-1)
    torch.testing.assert_close(out, num / den[..., None], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, den.log(), atol=1e-10, rtol=1e-10)


def test_form_choice_and_errors():
    assert choose_form(256, 32, 16, 32) == "quadratic" and choose_form(8192, 32, 16, 32) == "chunked"
    x = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="form"):
        prefix_linear_attention(x, x, x, x, x, 2, form="fast")


def test_prefix_is_bidirectional_rest_is_causal():
    m = get_layer("jrt", 32, 2, prefix_len=10).double()
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        x2 = x.clone()
        x2[:, 7] += 1.0  # inside the prefix: earlier positions see it (encoder region)
        assert (m(x2)[:, :7] - y[:, :7]).abs().max() > 1e-6
        x3 = x.clone()
        x3[:, 20] += 1.0  # after the prefix: nothing earlier changes
        assert (m(x3)[:, :20] - y[:, :20]).abs().max() == 0.0
        # prefix_len per call overrides the constructor's
        m0 = get_layer("jrt", 32, 2, prefix_len=0).double()
        m0.load_state_dict(m.state_dict())
        torch.testing.assert_close(m(x, prefix_len=0), m0(x))
        assert (m0(x) - y).abs().max() > 1e-6


def test_decode_after_prefill_equals_parallel():
    m = get_layer("jrt", 32, 2, prefix_len=9).double()
    x = torch.randn(2, 25, 32, dtype=torch.float64)
    y = m(x)
    y0, state = m.prefill(x[:, :12])
    torch.testing.assert_close(y0, y[:, :12], atol=1e-12, rtol=1e-12)
    ys = []
    for t in range(12, 25):
        yt, state = m.step(x[:, t], state)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y[:, 12:], atol=1e-12, rtol=1e-12)
    assert state[0].shape == (2, 2, 273, 16)


def test_lse_merges_with_exact_attention():
    """The normalised output with its log normaliser merges with another part: merging the encoder
    part and the causal part (each normalised alone) gives the joint output."""
    g = torch.Generator().manual_seed(0)
    T, M = 20, 6
    q, k, ke = (torch.randn(1, 1, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
    v, ve = (torch.randn(1, 1, T, 3, generator=g, dtype=torch.float64) for _ in range(2))
    joint = prefix_linear_attention(q, k, v, ke, ve, M, eps=1e-300)
    causal = prefix_linear_attention(q, k, v, ke, ve, 0, eps=1e-300)
    Ae = taylor_features(q) @ taylor_features(ke[:, :, :M]).transpose(-1, -2)
    enc = (Ae @ ve[:, :, :M] / Ae.sum(-1, keepdim=True), Ae.sum(-1).log())
    out, lse = merge_lse([causal, enc])
    torch.testing.assert_close(out, joint[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, joint[1], atol=1e-12, rtol=1e-12)


def test_jrt_prompt_transform():
    x, y = mqar(4, 64, 4, 64, seed=0)
    x2, y2 = jrt_prompt(x, y, 8)
    assert x2.shape == (4, 72) and y2.shape == (4, 72)
    assert torch.equal(x2[:, :8], x[:, :8]) and torch.equal(x2[:, 8:], x)
    assert (y2[:, :8] == -100).all() and torch.equal(y2[:, 8:], y)
    assert int((y2 != -100).sum()) == int((y != -100).sum())
    with pytest.raises(ValueError, match="context_len"):
        jrt_prompt(x, y, 65)
    with pytest.raises(ValueError, match="labels"):
        jrt_prompt(x, y[:, :5], 8)
    with pytest.raises(ValueError, match="inputs"):
        jrt_prompt(x[0], y[0], 8)


def test_training_smoke():
    first, last = train_smoke("jrt", prefix_len=0)
    assert last < 0.8 * first, (first, last)


def test_bf16_long_no_nan():
    m = get_layer("jrt", 32, 2, prefix_len=512).bfloat16()
    for T in (2048, 3000):  # the quadratic form, then the chunked one
        y = m(torch.randn(1, T, 32).bfloat16() * 4)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("cfg,arg", [({"feature_dim": 0}, "feature_dim"), ({"prefix_len": -1}, "prefix_len"),
                                     ({"eps": 0.0}, "eps"), ({"causal": False}, "causal")])
def test_invalid_configs(cfg, arg):
    with pytest.raises(ValueError, match=arg):
        get_layer("jrt", 32, 2, **cfg)
    assert layer_class("jrt").kind == "mixer" and "2407.05483" in layer_class("jrt").paper


def test_invalid_inputs():
    m = get_layer("jrt", 32, 2)
    with pytest.raises(ValueError, match="prefix_len"):
        m(torch.randn(1, 5, 32), prefix_len=-3)
    with pytest.raises(ValueError, match="x_t"):
        m.step(torch.randn(1, 2, 32), None)
