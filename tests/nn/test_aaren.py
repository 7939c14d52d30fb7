"""aaren mixer: the prefix scan equals softmax attention of the learned query over every prefix
(float64), lse merges with other parts, decode equals the parallel form, training smoke, bf16 on
long sequences, invalid configs."""
import pytest
import torch

from sparsattn.nn import get_layer, layer_class
from sparsattn.kernels.merge import merge_lse
from sparsattn.nn.mixers.aaren import aaren_scan, aaren_step

from .mixer_helpers import future_leak, train_smoke


def _softmax_prefix(s, v):
    T = s.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    S = s[..., None, :].expand(*s.shape[:-1], T, T).masked_fill(~mask, float("-inf"))
    return torch.softmax(S, -1) @ v, torch.logsumexp(S, -1)


@pytest.mark.parametrize("T", [1, 2, 37, 64, 100])
def test_scan_equals_softmax_attention(T):
    s = torch.randn(2, 3, T, dtype=torch.float64) * 6
    v = torch.randn(2, 3, T, 5, dtype=torch.float64)
    o, lse = aaren_scan(s, v)
    ref_o, ref_lse = _softmax_prefix(s, v)
    torch.testing.assert_close(o, ref_o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)


def test_layer_is_learned_query_attention():
    m = get_layer("aaren", 32, 2).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    k, v = m.kv_proj(x).split(32, -1)
    k = k.view(2, 19, 2, 16).transpose(1, 2)
    v = v.view(2, 19, 2, 16).transpose(1, 2)
    s = (k @ m.query[:, :, None]).squeeze(-1) / 4.0
    ref, _ = _softmax_prefix(s, v)
    torch.testing.assert_close(m(x), m.out_proj(ref.transpose(1, 2).reshape(2, 19, 32)), atol=1e-12, rtol=1e-12)


def test_lse_merges_disjoint_key_sets():
    """The last position's (out, lse) over keys [0, h) merged with the one over [h, T) equals the
    scan over all keys: the lse is the true log normaliser."""
    s = torch.randn(1, 2, 50, dtype=torch.float64) * 3
    v = torch.randn(1, 2, 50, 4, dtype=torch.float64)
    o, lse = aaren_scan(s, v)
    oa, la = aaren_scan(s[..., :21], v[..., :21, :])
    ob, lb = aaren_scan(s[..., 21:], v[..., 21:, :])
    om, lm = merge_lse([(oa[..., -1:, :], la[..., -1:]), (ob[..., -1:, :], lb[..., -1:])])
    torch.testing.assert_close(om, o[..., -1:, :], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lm, lse[..., -1:], atol=1e-12, rtol=1e-12)
    # an empty part (lse = -inf) contributes nothing
    om2, _ = merge_lse([(o, lse), (torch.zeros_like(o), torch.full_like(lse, float("-inf")))])
    torch.testing.assert_close(om2, o)


def test_decode_equals_parallel():
    m = get_layer("aaren", 48, 3).double()
    x = torch.randn(2, 33, 48, dtype=torch.float64)
    y = m(x)
    state, ys = None, []
    for t in range(33):
        yt, state = m.step(x[:, t], state)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-12, rtol=1e-12)
    assert state[2].shape == (2, 3, 16)  # constant-size state: (m, u, w) per head
    assert future_leak(m, x, 17) == 0.0


def test_step_function_extreme_scores():
    o, lse, st = aaren_step(torch.tensor([1e4]), torch.tensor([[1.0]]))
    o, lse, st = aaren_step(torch.tensor([-1e4]), torch.tensor([[5.0]]), st)
    assert torch.isfinite(o).all() and float(o) == 1.0 and float(lse) == 1e4


def test_training_smoke():
    first, last = train_smoke("aaren")
    assert last < 0.9 * first, (first, last)


def test_bf16_long_no_nan():
    s = (torch.randn(1, 2, 8192) * 80).bfloat16()
    v = torch.randn(1, 2, 8192, 8).bfloat16()
    o, lse = aaren_scan(s, v)
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all() and torch.isfinite(lse).all()
    m = get_layer("aaren", 64, 4).bfloat16()
    assert torch.isfinite(m(torch.randn(1, 4096, 64).bfloat16() * 10)).all()


@pytest.mark.parametrize("cfg,arg", [({"causal": False}, "causal"), ({"bias": "no"}, "bias"),
                                     ({"query_dim": 3}, "config")])
def test_invalid_configs(cfg, arg):
    with pytest.raises(ValueError, match=arg):
        get_layer("aaren", 32, 2, **cfg)
    with pytest.raises(ValueError, match="dim"):
        get_layer("aaren", 30, 4)
    assert layer_class("aaren").kind == "mixer"


def test_invalid_inputs():
    with pytest.raises(ValueError, match="^s"):
        aaren_scan(torch.randn(2, 5), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="x"):
        get_layer("aaren", 32, 2)(torch.randn(3, 32))
