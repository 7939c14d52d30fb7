"""MoA: exact per-head sink+window patterns, the span search, plan files, and gradient profiling."""
import itertools
import math

import pytest
import torch

from sparsattn.calibration import ModelShape
from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext
from sparsattn.calibrate.moa import diagonal_sums, fit_moa, masking_effect, profile_moa
from sparsattn.methods.moa import MoA, candidate_grid, search_plan, span_density, spans_for


def _plan(L=2, H=4, Hkv=2, D=16, sink=16, min_span=8):
    alpha = [[10.0, 70.0, -50.0, 200.0][:H] for _ in range(L)]
    beta = [[0.0, 0.1, 0.5, 0.0][:H] for _ in range(L)]
    return MoA().set_plan(ModelShape(L, H, Hkv, D), alpha, beta, sink=sink, min_span=min_span)


@pytest.mark.parametrize("Tq,Tk", [(333, 333), (200, 517), (63, 63)])
def test_pattern_is_exact_sink_window_mask(Tq, Tk):
    m = _plan()
    q = torch.randn(1, 4, Tq, 16)
    k = torch.randn(1, 2, Tk, 16)
    p = m.select(q, k, SelectContext(layer=1))
    p.validate()
    M = p.to_dense_mask()[0]
    sp = m.spans(1, Tk)
    assert sp.tolist() == [max(8, min(Tk, round(a + b * Tk))) for a, b in zip([10, 70, -50, 200], [0, .1, .5, 0])]
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    for h in range(4):
        ref = ((j < 16) | ((i - j) < sp[h])) & (j <= i)
        assert torch.equal(M[h], ref), h
        if Tq == Tk:
            assert float(span_density(sp[h], 16, Tk)) == pytest.approx(ref.float().sum().item() / (Tk * (Tk + 1) / 2))


def test_unfitted_and_shape_mismatch(tmp_path):
    m = get_method("moa")
    assert not m.is_fitted
    q, k = torch.randn(1, 4, 128, 16), torch.randn(1, 2, 128, 16)
    with pytest.raises(ValueError, match="fit_moa"):
        m.select(q, k, SelectContext(layer=0))
    m = _plan()
    with pytest.raises(ValueError, match="num_heads"):
        m.select(torch.randn(1, 8, 128, 16), torch.randn(1, 2, 128, 16), SelectContext(layer=0))
    with pytest.raises(ValueError, match="head_dim"):
        m.select(torch.randn(1, 4, 128, 32), torch.randn(1, 2, 128, 32), SelectContext(layer=0))
    with pytest.raises(ValueError, match="layer"):
        m.select(q, k, SelectContext(layer=5))
    with pytest.raises(ValueError, match="alpha"):
        MoA().set_plan(ModelShape(2, 4, 2, 16), [[0.0] * 3] * 2, [[0.0] * 4] * 2)
    path = m.save_plan(tmp_path / "plan.json")
    with pytest.raises(ValueError, match="num_heads"):
        MoA().load_plan(path, expect_shape=ModelShape(2, 8, 2, 16))


def test_plan_json_round_trip(tmp_path):
    m = _plan()
    path = m.save_plan(tmp_path / "plan.json")
    m2 = MoA(plan_path=str(path))
    assert torch.equal(m2.plan["alpha"], m.plan["alpha"]) and torch.equal(m2.plan["beta"], m.plan["beta"])
    assert m2.plan["sink"] == 16 and m2.plan["min_span"] == 8 and m2.plan["shape"] == m.plan["shape"]
    q, k = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16)
    a = m.select(q, k, SelectContext(layer=0)).to_dense_mask()
    b = m2.select(q, k, SelectContext(layer=0)).to_dense_mask()
    assert torch.equal(a, b)


def _synthetic_profile(lengths, n_heads, long_heads, alphas, betas, sink=64):
    """Heads in ``long_heads`` lose a lot unless their span covers the whole context; the others
    only need a short window."""
    loss, dens = [], []
    for n in lengths:
        sp = spans_for(alphas, betas, n, 64).double()
        per_head = []
        for h in range(n_heads):
            if h in long_heads:
                per_head.append(10.0 * (1 - sp / n))  # needs everything
            else:
                per_head.append(0.5 * torch.clamp(1 - sp / 128, min=0))  # 128 tokens suffice
        loss.append(torch.stack(per_head))
        dens.append(span_density(sp.long(), sink, n)[None].expand(n_heads, -1))
    return torch.stack(loss), torch.stack(dens)


def test_search_gives_long_spans_to_long_heads_and_meets_budget():
    lengths = (2048, 4096)
    alphas, betas = candidate_grid(lengths, 1024, 9)
    long_heads = {1, 4, 6}
    loss, dens = _synthetic_profile(lengths, 8, long_heads, alphas, betas)
    choice, info = search_plan(loss, dens, 0.5)
    assert info["feasible"]
    for li, n in enumerate(lengths):
        d = dens[li, torch.arange(8), choice].mean()
        assert float(d) <= 0.5 + 1e-9 and info["density"][li] == pytest.approx(float(d))
        spans = spans_for(alphas[choice], betas[choice], n, 64)
        assert min(spans[h] for h in long_heads) > max(spans[h] for h in range(8) if h not in long_heads)
        assert all(spans[h] >= 0.9 * n for h in long_heads), spans


def test_search_matches_brute_force_on_small_instance():
    g = torch.Generator().manual_seed(0)
    H, C = 4, 6
    dens = torch.rand(2, H, C, generator=g, dtype=torch.float64)
    loss = (1 - dens) * torch.rand(1, H, 1, generator=g, dtype=torch.float64) * 5  # denser -> less loss
    budget = 0.45
    choice, info = search_plan(loss, dens, budget)
    best = math.inf
    for combo in itertools.product(range(C), repeat=H):
        c = torch.tensor(combo)
        if (dens[:, torch.arange(H), c].mean(-1) <= budget).all():
            best = min(best, float(loss[:, torch.arange(H), c].sum()))
    assert info["feasible"]
    assert (dens[:, torch.arange(H), choice].mean(-1) <= budget + 1e-12).all()
    assert info["loss"] <= best * 1.05 + 1e-9, (info["loss"], best)
    with pytest.raises(ValueError, match="budget"):
        search_plan(loss, dens, 0.0)


def test_diagonal_sums():
    e = torch.randn(2, 3, 7, 7).tril()
    d = diagonal_sums(e)
    ref = torch.stack([torch.diagonal(e, offset=-k, dim1=-2, dim2=-1).sum(-1) for k in range(7)], -1)
    torch.testing.assert_close(d, ref)


def test_masking_effect_is_exact_for_a_loss_linear_in_A():
    """For L = sum(W * A) the renormalised first-order effect of masking one entry is exact."""
    g = torch.Generator().manual_seed(0)
    T = 6
    A = torch.softmax(torch.randn(T, T, generator=g, dtype=torch.float64).masked_fill(
        torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf), -1)
    W = torch.randn(T, T, generator=g, dtype=torch.float64)
    E = masking_effect(A, W, take_abs=False)
    for i in range(1, T):
        for j in range(i + 1):
            A2 = A.clone()
            A2[i, j] = 0
            A2[i] = A2[i] / A2[i].sum()
            assert float(E[i, j]) == pytest.approx(float((W * A2).sum() - (W * A).sum()), abs=1e-9)


def _few_files():
    import email

    from sparsattn.data import source_files
    from pathlib import Path

    return source_files("train", roots=[Path(email.__file__).resolve().parent])[:3]


class ByteTok:
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] + [3 + b for b in text.encode("utf-8")[:4000]]}


def _tiny_llama(layers=2):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return tf.LlamaForCausalLM(cfg).eval()


def test_profile_on_a_tiny_model_and_fit():
    model = _tiny_llama()
    ids = torch.randint(3, 259, (1, 160))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, -20:] = True
    prof = profile_moa(model, [(ids, mask)], sink=8)
    assert prof.shape == (2, 4, 160) and torch.isfinite(prof).all() and (prof >= 0).all() and prof.sum() > 0
    # the model's own output is unchanged by the profiling attention (it computes exact attention)
    assert model.config._attn_implementation != "sparsattn_moa_profile"
    moa = fit_moa(model, ByteTok(), lengths=(128, 192), budget=0.6, samples_per_length=1, answer_len=4, sink=8,
                  min_span=16, alpha_step=64, files=_few_files(), log=None)
    assert moa.is_fitted and moa.plan["shape"] == ModelShape(2, 4, 2, 16)
    assert all(d <= 0.6 + 1e-9 for d in moa.plan["info"]["density"])
    p = moa.select(torch.randn(1, 4, 192, 16), torch.randn(1, 2, 192, 16), SelectContext(layer=1))
    assert p.heads == 4 and p.density < 1.0


@pytest.mark.parametrize("data,lengths,least", [("copy", (64, 192), 80), ("retrieval", (192,), 256)])
def test_fit_refuses_lengths_too_short_for_its_data(data, lengths, least):
    with pytest.raises(ValueError, match=f"lengths: expected lengths >= {least}"):
        fit_moa(_tiny_llama(), ByteTok(), lengths=lengths, answer_len=4, data=data, files=_few_files(), log=None)
