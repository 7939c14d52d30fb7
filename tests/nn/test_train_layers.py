"""pathways, selective, landmark, s2, masformer (and dense): training, float64 references, dense
equivalence when everything is kept, bad configurations."""
import copy

import pytest
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.nn import get_layer
from sparsattn.nn.base import attention_backend
from sparsattn.nn.layers.landmark import grouped_softmax_attention
from sparsattn.nn.layers.masformer import masformer_mixers
from sparsattn.train.layerbench.model import LayerModel

DIM, HEADS = 32, 2
SMALL = 16  # width of the tests through the Triton interpreter
MINE = {
    "dense": {},
    "pathways": {"block_size": 16},
    "selective": {},
    "landmark": {"block_size": 8, "top_k": 2},
    "s2": {"block_size": 16, "local_blocks": 1, "vert_stride": 2},
    "masformer": {"window": 8, "layer_index": 0, "n_layers": 2},
}


def _like_dense(layer, dense):
    """Copy the dense layer's q/k/v/out weights into ``layer`` (the other parameters keep theirs)."""
    own = layer.state_dict()
    own.update({k: v for k, v in dense.state_dict().items() if k in own})
    layer.load_state_dict(own)
    return layer


# -- training --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MINE))
def test_layer_trains_on_tiny_recall(name):
    """A 2-block model learns a tiny associative-recall task through the layer: the loss falls."""
    torch.manual_seed(0)
    from sparsattn.eval.mqar import mqar

    x, y = mqar(64, 32, 4, 32, seed=1)
    model = LayerModel([name, name], DIM, HEADS, vocab=32, max_len=32, n_out=32, causal=True, mlp=False,
                       layer_config=MINE[name])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    with attention_backend("reference"):
        for step in range(40):
            xb, yb = x[(step % 4) * 16:(step % 4 + 1) * 16], y[(step % 4) * 16:(step % 4 + 1) * 16]
            h = model.hidden(xb)
            sel = yb != -100
            loss = torch.nn.functional.cross_entropy(model.head(h[sel]), yb[sel])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, f"{name}: loss {first:.3f} -> {last:.3f}"


# -- float64 dense-masked references (through the real kernel: Triton interpreter on the CPU) --


def _masked_reference(layer, x, mask, prep=None):
    """float64 copy of the layer: its projections, dense softmax on ``mask``, its output map."""
    l64 = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_(True)
    q, k, v = l64.split(x64)
    if prep is not None:
        q, k, v = prep(l64, x64, q, k, v)
    o, _ = dense_reference(q, k, v, causal=True, mask=mask)
    return l64.merge(o), x64, l64


def _check_grads(layer, y, x, y64, x64, l64):
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=1e-4)
    w, w64 = layer.qkv_proj.weight.grad, l64.qkv_proj.weight.grad
    torch.testing.assert_close(w.double(), w64, atol=2e-5, rtol=1e-4)


def test_pathways_matches_float64_on_its_sampled_pattern():
    layer = get_layer("pathways", SMALL, HEADS, block_size=16, subsample=3.0)
    x = torch.randn(2, 40, SMALL, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    p = layer.sample_pattern(2, 40, "cpu")
    assert p.density < 1.0
    y64, x64, l64 = _masked_reference(layer, x, p.to_dense_mask())
    _check_grads(layer, y, x, y64, x64, l64)


def test_s2_matches_float64_on_the_s2_pattern():
    layer = get_layer("s2", SMALL, HEADS, block_size=16, local_blocks=1, vert_stride=3)
    x = torch.randn(1, 60, SMALL, requires_grad=True)
    y = layer(x)
    p = layer.pattern(60, "cpu")
    assert p.heads == HEADS and p.density < 0.9
    y64, x64, l64 = _masked_reference(layer, x, p.to_dense_mask())
    _check_grads(layer, y, x, y64, x64, l64)


def test_selective_window_matches_float64_with_its_temperatures():
    layer = get_layer("selective", SMALL, HEADS, base="window", window=12, block_size=16)
    with torch.no_grad():  # non-trivial temperatures
        layer.tau_q.weight.normal_(0, 0.3)
        layer.tau_v.weight.normal_(0, 0.3)
        layer.beta.fill_(0.2)
    x = torch.randn(1, 37, SMALL, requires_grad=True)
    y = layer(x)
    i = torch.arange(37)
    mask = (i[:, None] - i[None, :] < 12)[None, None]

    def prep(l64, x64, q, k, v):
        tq, tv = l64.temperatures(x64)
        return q * tq, k, v * tv

    y64, x64, l64 = _masked_reference(layer, x, mask, prep)
    _check_grads(layer, y, x, y64, x64, l64)
    assert layer.tau_q.weight.grad.abs().sum() > 0 and layer.beta.grad.abs().sum() > 0


def test_masformer_window_matches_float64():
    layer = get_layer("masformer", SMALL, HEADS, window=10, layer_index=0, n_layers=2, full_layers=(1,), block_size=16)
    x = torch.randn(1, 33, SMALL, requires_grad=True)
    y = layer(x)
    i = torch.arange(33)
    y64, x64, l64 = _masked_reference(layer, x, (i[:, None] - i[None, :] < 10)[None, None])
    _check_grads(layer, y, x, y64, x64, l64)


def test_landmark_retrieval_equals_grouped_softmax_reference_in_float64():
    """Inference through the kernel (own block + top-k retrieved blocks, merged by landmark scores)
    equals the float64 torch grouped softmax restricted to the same top-k landmarks."""
    layer = get_layer("landmark", SMALL, HEADS, block_size=8, top_k=2).eval()
    x = torch.randn(1, 37, SMALL)  # 4 complete blocks and a partial one
    with torch.no_grad():
        y = layer(x)
        l64 = copy.deepcopy(layer).double()
        x64 = x.double()
        q, k, v = l64.split(x64)
        ref = l64.merge(grouped_softmax_attention(q, k, v, l64.landmark_keys(x64), 8, (SMALL // HEADS) ** -0.5,
                                                  top_k=2).double())
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=1e-4)
    assert 0 < layer.last_density < 1


def test_landmark_gradients_match_float64():
    layer = get_layer("landmark", DIM, HEADS, block_size=8)
    x = torch.randn(2, 30, DIM, requires_grad=True)
    y = layer(x)
    l64 = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_(True)
    q, k, v = l64.split(x64)
    y64 = l64.merge(grouped_softmax_attention(q, k, v, l64.landmark_keys(x64), 8, (DIM // HEADS) ** -0.5).double())
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layer.pool.weight.grad.double(), l64.pool.weight.grad, atol=2e-5, rtol=1e-4)


def test_grouped_softmax_is_a_distribution_over_keys():
    """Each query's weights (local + spread landmark mass) sum to one: with v = 1 the output is 1."""
    B, H, T, D, bs = 1, 2, 29, 4, 6
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    lk = torch.randn(B, H, T // bs, D)
    out = grouped_softmax_attention(q, k, torch.ones(B, H, T, 1), lk, bs, 0.5)
    torch.testing.assert_close(out, torch.ones_like(out))


# -- equal to dense when everything is kept --------------------------------------------------


@pytest.mark.parametrize("name,cfg,mode", [
    ("pathways", {"subsample": 1.0, "block_size": 16}, "train"),
    ("pathways", {"block_size": 16}, "eval"),
    ("selective", {}, "train"),                                     # temperatures start at 1
    ("selective", {"scale_query": False, "scale_value": False}, "train"),
    ("selective", {"base": "window", "window": 64, "block_size": 16}, "train"),
    ("landmark", {"block_size": 64}, "train"),                      # one block: local = causal
    ("landmark", {"block_size": 64}, "eval"),
    ("s2", {"block_size": 16, "local_blocks": 1, "vert_stride": 1}, "train"),
    ("masformer", {"layer_index": 1, "n_layers": 2, "full_layers": (-1,)}, "train"),
    ("masformer", {"layer_index": 0, "n_layers": 2, "full_layers": (1,), "window": 64}, "train"),
])
def test_keep_everything_equals_dense(name, cfg, mode):
    dense = get_layer("dense", DIM, HEADS)
    layer = _like_dense(get_layer(name, DIM, HEADS, **cfg), dense)
    layer.train(mode == "train")
    x = torch.randn(2, 41, DIM)
    with torch.no_grad(), attention_backend("reference"):
        torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-4)


def test_landmark_keeps_all_landmarks_equals_grouped_and_runs_past_the_trained_length():
    layer = get_layer("landmark", DIM, HEADS, block_size=8, top_k=64)
    x = torch.randn(1, 50, DIM)
    with torch.no_grad(), attention_backend("reference"):
        grouped = layer.train()(x)
        retrieved = layer.eval()(x)
        torch.testing.assert_close(retrieved, grouped, atol=1e-5, rtol=1e-4)
        long = get_layer("landmark", DIM, HEADS, block_size=8, top_k=2).eval()
        y = long(torch.randn(1, 300, DIM))  # any length: no positional limit in the layer
    assert torch.isfinite(y).all() and long.last_density < 0.25


def test_pathways_ensemble_is_sparse_and_finite():
    layer = get_layer("pathways", DIM, HEADS, block_size=16, inference="ensemble", ensemble_size=3).eval()
    with torch.no_grad(), attention_backend("reference"):
        y = layer(torch.randn(2, 64, DIM))
    assert torch.isfinite(y).all()
    c = layer.cost(256)
    assert c["density"] < 0.5 and c["train_density"] == c["density"]


def test_masformer_mixers_builds_the_hybrid():
    mixers = masformer_mixers(4, (1, -1), inner="s2", inner_config={"block_size": 16, "vert_stride": 2,
                                                                     "local_blocks": 1})
    assert [m if isinstance(m, str) else m[0] for m in mixers] == ["s2", "dense", "s2", "dense"]
    model = LayerModel(mixers, DIM, HEADS, vocab=16, max_len=64, n_out=16, causal=True)
    with attention_backend("reference"):
        assert model.hidden(torch.randint(0, 16, (2, 64))).shape == (2, 64, DIM)
    c = model.cost(64)
    assert 0 < c["density"] < 1
    model = LayerModel(["masformer"] * 3, DIM, HEADS, vocab=16, max_len=64, n_out=16, causal=True,
                       layer_config={"window": 8})
    assert [m.full for m in model.mixers()] == [False, False, True]


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cfg,arg", [
    ("pathways", {"subsample": 0.5}, "subsample"),
    ("pathways", {"block_size": 24}, "block_size"),
    ("pathways", {"locality": -1.0}, "locality"),
    ("pathways", {"inference": "mean"}, "inference"),
    ("selective", {"base": "hash"}, "base"),
    ("selective", {"window": 0}, "window"),
    ("selective", {"scale_query": 1}, "scale_query"),
    ("landmark", {"top_k": 0}, "top_k"),
    ("landmark", {"block_size": 1}, "block_size"),
    ("landmark", {"causal": False}, "causal"),
    ("landmark", {"tile": 24}, "tile"),
    ("s2", {"vert_stride": 0}, "vert_stride"),
    ("s2", {"block_size": 48}, "block_size"),
    ("s2", {"causal": False}, "causal"),
    ("masformer", {"full_layers": (5,), "n_layers": 2}, "full_layers"),
    ("masformer", {"layer_index": 3, "n_layers": 2}, "layer_index"),
    ("masformer", {"inner": "masformer"}, "inner"),
    ("masformer", {"inner": "nope", "full_layers": ()}, "layer"),
    ("dense", {"causal": "yes"}, "causal"),
])
def test_bad_config_names_the_argument(name, cfg, arg):
    with pytest.raises(ValueError, match=arg):
        get_layer(name, DIM, HEADS, **cfg)


@pytest.mark.parametrize("name", sorted(MINE))
def test_bad_input_and_odd_lengths(name):
    layer = get_layer(name, DIM, HEADS, **{k: v for k, v in MINE[name].items()})
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(2, 10, DIM + 1))
    with attention_backend("reference"), torch.no_grad():
        for T in (1, 17, 63):  # T not a multiple of any block
            assert layer(torch.randn(1, T, DIM)).shape == (1, T, DIM)
    with pytest.raises(ValueError, match="dim"):
        get_layer(name, 30, 4)
