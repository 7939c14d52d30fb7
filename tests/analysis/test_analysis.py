"""Tests of sparsattn.analysis on tiny Llama models wired so that the answer is known."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

NEEDLE = 5  # the token the wired head copies
NEEDLE_POS = 20
T = 48


def _config(**kw):
    base = dict(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
                rope_parameters={"rope_theta": 1e12, "rope_type": "default"})
    base.update(kw)
    return transformers.LlamaConfig(**base)


def _copy_model():
    """Layer 0 head 0 attends to the NEEDLE token from every later position (its key alone matches the
    constant query, on RoPE's slowest dimension pair, which barely rotates at theta 1e12) and writes
    that token's embedding into the residual: the model emits NEEDLE; everything else is silent."""
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(_config(attention_bias=True)).eval()
    with torch.no_grad():
        e = m.model.embed_tokens.weight
        e.normal_()
        e[:, 0] = 0
        e[NEEDLE] = 0
        e[NEEDLE, 0] = 1.0
        for i, layer in enumerate(m.model.layers):
            a = layer.self_attn
            for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
                p.weight.zero_()
                p.bias.zero_() if p.bias is not None else None
            layer.mlp.down_proj.weight.zero_()
            if i == 0:
                a.q_proj.bias[7] = 1.0  # head 0, dimension 7: the lowest RoPE frequency
                a.k_proj.weight[7, 0] = 8.0  # head 0's key reads embedding dimension 0 (only NEEDLE has it)
                a.v_proj.weight[0, 0] = 1.0
                a.o_proj.weight[0, 0] = 20.0
    return m


def _prompt(seed=0):
    rng = random.Random(seed)
    ids = [rng.randrange(6, 32) for _ in range(T)]
    ids[NEEDLE_POS] = NEEDLE
    return ids


def test_wired_copy_head_scores_as_retrieval_head_and_masking_it_breaks_the_copy():
    from sparsattn.analysis import retrieval_heads as rh

    m = _copy_model()
    sc, info = rh.score_sample(m, _prompt(), [NEEDLE])
    assert info["needle_start"] == NEEDLE_POS and info["copied"] == 1
    assert sc[0, 0] == 1.0
    others = sc.clone()
    others[0, 0] = 0
    assert float(others.max()) < rh.THRESHOLD
    top = rh.ranked_heads(sc)
    assert top[0][:2] == (0, 0)
    sample = SimpleNamespace(prompt_ids=_prompt(1), answer_ids=[NEEDLE])
    rows = rh.masking_test(m, [sample], top, k=1, n_random=2, show_progress=False)
    by = {r["masked"]: r["correct"] for r in rows}
    assert by["none"] == 1 and by["top1"] == 0
    assert by["random1#0"] == 1 and by["random1#1"] == 1


def test_fitted_razor_and_masformer_files_load(tmp_path):
    from sparsattn.analysis import fit_methods as fm
    from sparsattn.methods import get_method

    m = _copy_model()
    shape = fm.model_shape(m)
    scores = torch.tensor([[0.9, 0.0], [0.05, 0.3]])
    p = fm.fit_razor(scores, shape, 2, tmp_path / "razor.json")
    r = get_method("razor", path=str(p))
    assert r.retrieval_heads == {0: [0], 1: [1]}
    plan = fm.read_masformer_plan(fm.fit_masformer(scores, shape, 1, tmp_path / "plan.json", {"n_init": 4}))
    assert plan["full_layers"] == (0,)
    get_method("masformer", **plan)
    with pytest.raises(ValueError, match="scores"):
        fm.fit_razor(torch.zeros(3, 2), shape, 1, tmp_path / "bad.json")


def test_planted_sink_is_found_and_act_moves_attention_off_it():
    from sparsattn.analysis import sinks
    from sparsattn.analysis._common import attention_rows, edit_attention

    m = _copy_model()
    rows = sinks.find_sinks(m, torch.tensor([_prompt()]))
    r00 = next(r for r in rows if (r["layer"], r["head"]) == (0, 0))
    assert r00["n_sinks"] == 1 and r00["sink_positions"] == str(NEEDLE_POS)
    assert all(r["n_sinks"] == 0 for r in rows if (r["layer"], r["head"]) != (0, 0))
    # ACT on the captured attention: sink entries x beta, rows still sum to one
    from sparsattn.capture import capture_qkv

    ids = torch.tensor([_prompt()])
    q, k, _ = capture_qkv(m, ids)[0]
    p = attention_rows(q, k, float(m.model.layers[0].self_attn.scaling))
    c = sinks.act_calibrate(p, [0], beta=0.4)
    assert torch.allclose(c.sum(-1), torch.ones_like(c.sum(-1)), atol=1e-5)
    assert torch.allclose(c[0, 0, NEEDLE_POS:, NEEDLE_POS], 0.4 * p[0, 0, NEEDLE_POS:, NEEDLE_POS], atol=1e-6)
    assert torch.equal(c[:, 1], p[:, 1])
    # through the model: calibrating the copy head weakens the copied token's logit
    with torch.no_grad():
        base = m(input_ids=ids).logits[0, -1, NEEDLE]
        with edit_attention(m, sinks.act_edits([(0, 0)], beta=0.1)):
            cal = m(input_ids=ids).logits[0, -1, NEEDLE]
    assert cal < base


def _relu_model(zero_fracs=(0.75, 0.25)):
    torch.manual_seed(1)
    m = transformers.LlamaForCausalLM(_config(hidden_act="relu", mlp_bias=True)).eval()
    with torch.no_grad():
        for layer, z in zip(m.model.layers, zero_fracs):
            mlp = layer.mlp
            n0 = int(z * mlp.gate_proj.out_features)
            mlp.gate_proj.weight.zero_()
            mlp.gate_proj.bias.fill_(1.0)
            mlp.gate_proj.bias[:n0] = 0.0  # relu(0) = 0: these neurons are always exactly zero
            mlp.up_proj.bias.fill_(0.5)
    return m


def test_relu_mlp_with_known_zeros_reports_that_sparsity():
    from sparsattn.analysis import activations as act

    m = _relu_model()
    stream = torch.randint(0, 32, (200,), generator=torch.Generator().manual_seed(0))
    rep = act.analyze(m, None, stream=stream, calib_tokens=64, p_targets=(5.0,), topk=(0.5,), cett_grid=(0.1, 0.5),
                      search_steps=2, show_progress=False)
    zf = {r["layer"]: r["zero_frac"] for r in rep.summary["layers"]}
    assert zf == {0: pytest.approx(0.75), 1: pytest.approx(0.25)}
    dense = next(r for r in rep.rows if r["kind"] == "dense")
    assert dense["sparsity"] == pytest.approx(0.5)
    tk = next(r for r in rep.rows if r["kind"] == "topk")
    assert tk["sparsity"] >= 0.5 - 1e-6
    pp = rep.summary["ppl_p"][0]
    assert pp["ppl_ratio"] <= 1.05 + 1e-9 and pp["sparsity"] >= 0.5 - 1e-6  # thresholds keep the known zeros


def test_core_neurons_of_a_relu_mlp_are_its_active_neurons_and_core_only_decode_is_exact():
    from sparsattn.analysis import core_neurons as cn
    from sparsattn.analysis.activations import collect

    m = _relu_model()
    ids = torch.randint(0, 32, (1, 40), generator=torch.Generator().manual_seed(2))
    acts = collect(m, ids)
    d_ff = acts[0].shape[1]
    core = cn.sentence_core(acts[0][:30], alpha=1.0, beta=0.25)
    assert core.tolist() == list(range(int(0.75 * d_ff), d_ff))
    with torch.no_grad():
        full = m(input_ids=ids).logits
        with cn.core_mlp(m, 30, [0], alpha=1.0, beta=0.25):
            core_out = m(input_ids=ids).logits
        with cn.core_mlp(m, 30, [0, 1], alpha=1.0, beta=0.1):
            cut = m(input_ids=ids).logits
    assert torch.allclose(core_out, full, atol=1e-5)
    assert torch.equal(cut[:, :30], full[:, :30]) and not torch.allclose(cut[:, 30:], full[:, 30:], atol=1e-3)


def test_patterns_table_matches_dense():
    from sparsattn.analysis.patterns import run_patterns

    rows = run_patterns(Tq_self=72, Tq_cross=40, Tk_cross=104, heads=2, kv_heads=1, head_dim=24, block=32,
                        device="cpu", show_progress=False)
    assert len(rows) == 12 and {r["pattern"] for r in rows} == {"causal self", "non-causal self", "causal cross",
                                                                   "non-causal cross"}
    for r in rows:
        assert not r["nan"] and r["rel_error"] < 1e-4, r
        if r["mask"] == "full":
            assert r["full_vs_plain"] < 1e-4


def test_unreadable_models_get_one_line_errors(tmp_path, capsys):
    from sparsattn.analysis._common import attention_layers, mlp_layers
    from sparsattn.analysis.cli import main

    with pytest.raises(ValueError, match="no attention module"):
        attention_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    m = _relu_model()
    m.model.layers[1].mlp = torch.nn.Identity()
    with pytest.raises(ValueError, match="layer 1 MLP .* missing gate_proj"):
        mlp_layers(m)
    (tmp_path / "config.json").write_text("{}")
    assert main(["sinks", "--model", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "safetensors" in err
