"""decode_quality: the question goes through the decode path, full-budget equality for every decode method,
top-k recall on hand-made cases, budget mapping, and a whole (tiny) run writing its outputs."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from sparsattn.eval import decode_quality as dq
from sparsattn.eval.tasks import QUESTION_TEMPLATE, passkey
from sparsattn.methods import get_method, list_methods
from sparsattn.patterns import TokenPattern

N_LAYERS = 4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model():
    """A random tiny Llama (4 layers, 4 query / 2 KV heads, head_dim 16) whose vocabulary covers the test BPE."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=640, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def sample_ids(hf_tok):
    s = passkey(hf_tok, 200, 0.4, seed=3)
    ids, n_pre = dq.split_prompt(hf_tok, s)
    return s, ids, n_pre


def _prefix_and_tail(model, ids, n_pre):
    t = torch.tensor([ids])
    return dq.prefill(model, t[:, :n_pre]), t[:, n_pre:]


def _channels(model, tok):
    return dq.calibrate_double_sparsity(model, tok, length=160, seed=dq.CALIBRATION_SEED)


def _make(name, budget, channels, G=2):
    cfg = dq.budget_config(name, budget, n_layers=N_LAYERS, group_size=G)
    if name == "double_sparsity":
        cfg["channels"] = channels
    return get_method(name, **cfg)


# ----------------------------------------------------------------------------------------------
# the split: the question is not prefilled, it goes through the method's select at decode
# ----------------------------------------------------------------------------------------------

def test_split_prompt_cuts_before_the_question(hf_tok, sample_ids):
    s, ids, n_pre = sample_ids
    tail_text = hf_tok.decode(ids[n_pre:])
    q = QUESTION_TEMPLATE.format(key=s.meta["key"])
    assert q in tail_text                      # the whole question is in the decoded part
    assert "What is" not in hf_tok.decode(ids[:n_pre])
    assert ids == dq.encode_ids(hf_tok, s.prompt)


def test_split_prompt_rejects_other_prompts(hf_tok):
    from sparsattn.eval.tasks import Sample

    with pytest.raises(ValueError, match="sample"):
        dq.split_prompt(hf_tok, Sample(prompt="hello there", answers=["1"], meta={"key": "x"}))


def test_question_tokens_go_through_the_decode_select(tiny_model, hf_tok, sample_ids):
    _, ids, n_pre = sample_ids
    kv, tail = _prefix_and_tail(tiny_model, ids, n_pre)
    assert all(k.shape[2] == n_pre for k, _ in kv)  # the prefill stops before the question
    n_q, new = tail.shape[1], 3
    m = get_method("streaming_llm", n_sink=2, window=6)
    res = dq.decode_run(tiny_model, kv, tail, max_new_tokens=new, method=m, backend="reference", keep_logits=True)
    # every layer called select at decode for every question token and every fed-back answer token
    assert res.calls == {"decode": N_LAYERS * (n_q + new - 1)}
    assert res.recall["calls"] == N_LAYERS * n_q  # recall recorded on the teacher-forced steps only
    assert "select" not in vars(m)  # the wrapper is removed
    dense = dq.decode_run(tiny_model, kv, tail, max_new_tokens=new, keep_logits=True)
    assert res.step_logits.shape == dense.step_logits.shape == (n_q + new - 1, 640)
    # the sparse selection really changed the teacher-forced steps (the decode path was used)
    assert (res.step_logits[:n_q] - dense.step_logits[:n_q]).abs().max() > 1e-3
    assert 0 < res.recall["density"] < 1 and 0 <= res.recall["top10_recall"] < 1
    # the prefix cache is not modified by a run
    assert all(k.shape[2] == n_pre for k, _ in kv)


# ----------------------------------------------------------------------------------------------
# full budget == dense, for every registered decode method
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_methods("decode"))
def test_full_budget_generation_equals_dense(name, tiny_model, hf_tok, sample_ids):
    if name == "retrieval_attention":
        pytest.importorskip("hnswlib", reason="retrieval_attention's HNSW index needs the optional 'ann' extra")
    _, ids, n_pre = sample_ids
    kv, tail = _prefix_and_tail(tiny_model, ids, n_pre)
    channels = _channels(tiny_model, hf_tok) if name == "double_sparsity" else None
    dense = dq.decode_run(tiny_model, kv, tail, max_new_tokens=4, keep_logits=True)
    full = dq.decode_run(tiny_model, kv, tail, max_new_tokens=4, method=_make(name, 2 * len(ids), channels),
                         backend="reference", keep_logits=True)
    assert full.tokens == dense.tokens
    torch.testing.assert_close(full.step_logits, dense.step_logits, rtol=1e-4, atol=1e-4)
    assert full.recall["top10_recall"] == pytest.approx(1.0) and full.recall["density"] == pytest.approx(1.0)
    # and a small budget does change the computation (the method is really in the decode path)
    small = dq.decode_run(tiny_model, kv, tail, max_new_tokens=4, method=_make(name, 24, channels),
                          backend="reference", keep_logits=True)
    n_q = tail.shape[1]
    assert (small.step_logits[:n_q] - dense.step_logits[:n_q]).abs().max() > 1e-4
    assert small.recall["density"] < 0.9


# ----------------------------------------------------------------------------------------------
# top-k recall
# ----------------------------------------------------------------------------------------------

def _hand_case():
    """q heads 0/1 (one KV head): head 0 ranks token t by t, head 1 by 11 - t."""
    T = 12
    t = torch.arange(T, dtype=torch.float32)
    k = torch.stack([t, 11 - t], -1)[None, None]  # [1, 1, 12, 2]
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, 2, 2]
    return q, k, T


def test_topk_recall_hand_made_tokens():
    q, k, T = _hand_case()
    sel = torch.zeros(1, 1, T, dtype=torch.bool)
    sel[..., :5] = True  # tokens 0..4
    p = TokenPattern.from_mask(sel, kv_len=T)
    r = dq.topk_recall(q, k, p, top=10)
    # head 0's top-10 = tokens 2..11 (3 selected); head 1's = tokens 0..9 (5 selected)
    torch.testing.assert_close(r, torch.tensor([[0.3, 0.5]]))
    torch.testing.assert_close(dq.topk_recall(q[:, :, None], k, sel, top=10), r)  # [B, Hq, 1, D] and a mask
    torch.testing.assert_close(dq.topk_recall(q, k, p, top=3), torch.tensor([[0.0, 1.0]]))


def test_topk_recall_pages_rows_and_lengths():
    q, k, T = _hand_case()
    page = TokenPattern.from_mask(torch.tensor([[[False, False, True]]]), page_size=4, kv_len=T)  # tokens 8..11
    torch.testing.assert_close(dq.topk_recall(q, k, page, top=10), torch.tensor([[0.4, 0.2]]))
    per_head = torch.zeros(1, 2, T, dtype=torch.bool)
    per_head[0, 0, 11] = True
    per_head[0, 1, :10] = True
    torch.testing.assert_close(dq.topk_recall(q, k, per_head, top=10), torch.tensor([[0.1, 1.0]]))
    # only tokens 0..5 valid: head 0's top is 0..5 (6 keys); the selection 0..4 holds 5 of them
    sel = torch.zeros(1, 1, T, dtype=torch.bool)
    sel[..., :5] = True
    torch.testing.assert_close(dq.topk_recall(q, k, sel, top=10, kv_lens=torch.tensor([6])),
                               torch.tensor([[5 / 6, 5 / 6]]))


def test_topk_recall_bad_input():
    q, k, T = _hand_case()
    with pytest.raises(ValueError, match="pattern"):
        dq.topk_recall(q, k, TokenPattern.from_mask(torch.ones(1, 1, 5, dtype=torch.bool), kv_len=5))
    with pytest.raises(ValueError, match="q/k"):
        dq.topk_recall(q, k[..., :1], torch.ones(1, 1, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="top"):
        dq.topk_recall(q, k, torch.ones(1, 1, T, dtype=torch.bool), top=0)


# ----------------------------------------------------------------------------------------------
# budgets
# ----------------------------------------------------------------------------------------------

def test_parse_budget():
    assert dq.parse_budget("64").tokens(4096) == 64
    assert dq.parse_budget("0.02").tokens(4096) == 82
    assert dq.parse_budget("full").tokens(4096) == 8192
    for bad in ("0", "-3", "1.5", "abc", "0.0"):
        with pytest.raises(ValueError, match="--budgets"):
            dq.parse_budget(bad)


@pytest.mark.parametrize("name", list_methods("decode"))
def test_every_decode_method_has_a_budget_mapping(name):
    for B in (16, 64, 1000):
        cfg = dq.budget_config(name, B, n_layers=8, group_size=4)
        get_method(name, **cfg)  # valid hyper-parameters
    with pytest.raises(ValueError, match="budget_tokens"):
        dq.budget_config(name, 0, n_layers=8, group_size=4)


def test_budget_mapping_values():
    assert dq.budget_config("tidal_decode", 64, n_layers=8, group_size=4)["correction_layer"] == 3
    assert dq.budget_config("tidal_decode", 64, n_layers=32, group_size=4)["correction_layer"] == 13
    ra = dq.budget_config("retrieval_attention", 256, n_layers=8, group_size=4)
    assert ra["n_sink"] + ra["window"] + 4 * ra["top_k"] <= 256
    with pytest.raises(ValueError, match="no budget mapping"):
        dq.budget_config("minference", 64, n_layers=8, group_size=4)


# ----------------------------------------------------------------------------------------------
# a whole run
# ----------------------------------------------------------------------------------------------

def test_run_writes_outputs_and_respects_the_time_limit(tiny_model, hf_tok, tmp_path):
    res = dq.run_decode_quality(tiny_model, hf_tok, out_dir=tmp_path, lengths=[160], budgets=["16", "0.25"], n=3,
                                methods=["streaming_llm", "quest"], full_n=1, max_new_tokens=3, time_limit=1e-6,
                                log=lambda s: None)
    rows = list(csv.DictReader(open(tmp_path / "decode_quality.csv")))
    assert list(rows[0])[:6] == ["method", "budget", "length", "accuracy", "top10_recall", "n"]
    got = {(r["method"], r["budget"]) for r in rows}
    assert got == {("dense", "dense"), ("dense_kernel", "full")} | {(m, b) for m in ("streaming_llm", "quest")
                                                                     for b in ("16", "0.25", "full")}
    assert all(r["n"] == "1" for r in rows)  # the time limit stopped after the first round
    for r in rows:
        if r["method"] != "dense":
            assert 0 <= float(r["top10_recall"]) <= 1 and 0 <= float(r["accuracy"]) <= 100
        if r["budget"] == "full":
            assert float(r["match_dense"]) == 1.0 and float(r["top10_recall"]) == 1.0
            assert float(r["match_kernel_dense"]) == 1.0 and float(r["max_logit_diff"]) < 1e-3
    q40 = next(r for r in rows if r["method"] == "quest" and r["budget"] == "0.25")
    assert q40["budget_tokens"] == "40"
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and "date_utc" in env
    assert "stopped_early" in env
    for f in ("accuracy_vs_budget.png", "top10_recall_vs_budget.png", "decode_quality_layers.csv", "configs.json"):
        assert (tmp_path / f).stat().st_size > 0
    layers = list(csv.DictReader(open(tmp_path / "decode_quality_layers.csv")))
    assert {int(r["layer"]) for r in layers} == set(range(N_LAYERS))
    assert len(res["sample_rows"]) == 2 + 2 * 3


def test_run_bad_arguments(tiny_model, hf_tok, tmp_path):
    kw = dict(out_dir=tmp_path, log=lambda s: None)
    with pytest.raises(ValueError, match="methods"):
        dq.run_decode_quality(tiny_model, hf_tok, methods=["minference"], lengths=[160], **kw)
    with pytest.raises(ValueError, match="lengths"):
        dq.run_decode_quality(tiny_model, hf_tok, lengths=[10], **kw)
    with pytest.raises(ValueError, match="--budgets"):
        dq.run_decode_quality(tiny_model, hf_tok, lengths=[160], budgets=["x"], **kw)
    assert dq.main(["--out", str(tmp_path), "--budgets", "0"]) == 2


def test_a_failing_method_is_reported_and_the_others_go_on(tiny_model, hf_tok, tmp_path, monkeypatch):
    from sparsattn.methods.streaming_llm import StreamingLLM

    def boom(self, q, k, ctx=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(StreamingLLM, "select", boom)
    res = dq.run_decode_quality(tiny_model, hf_tok, out_dir=tmp_path, lengths=[160], budgets=["16"], n=1,
                                methods=["streaming_llm", "quest"], full_n=0, max_new_tokens=2, log=lambda s: None)
    assert len(res["errors"]) == 1 and "streaming_llm" in res["errors"][0] and "boom" in res["errors"][0]
    assert {r["method"] for r in res["rows"]} == {"dense", "quest"}
    assert json.loads((tmp_path / "environment.json").read_text())["errors"] == res["errors"]


def test_method_config_overrides_the_mapping(tiny_model, hf_tok, tmp_path):
    res = dq.run_decode_quality(tiny_model, hf_tok, out_dir=tmp_path, lengths=[160], budgets=["32"], n=1,
                                methods=["double_sparsity"], full_n=0, max_new_tokens=2, log=lambda s: None,
                                method_config={"double_sparsity": {"group_factor": 4, "label_bits": 16}})
    cfg = json.loads((tmp_path / "configs.json").read_text())["double_sparsity"]["32"]["160"]
    assert cfg == {"token_budget": 32, "group_factor": 4, "label_bits": 16}
    assert res["environment"]["args"]["method_config"] == {"double_sparsity": {"group_factor": 4, "label_bits": 16}}
    for bad in ({"quest": {"token_budget": 8}}, {"double_sparsity": {"nope": 1}}):
        with pytest.raises(ValueError):
            dq.run_decode_quality(tiny_model, hf_tok, out_dir=tmp_path, lengths=[160], methods=["double_sparsity"],
                                  method_config=bad, log=lambda s: None)
    assert dq.main(["--out", str(tmp_path), "--method-config", "{bad"]) == 2

