"""Tests of sparsattn.eval.prefill_quality: teacher-forced scoring, density search, outputs."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparsattn.eval import prefill_quality as pq


# ----------------------------------------------------------------------------------------------
# teacher-forced scoring
# ----------------------------------------------------------------------------------------------

def test_score_counts_one_wrong_digit_as_wrong():
    gold = [223, 21, 25, 20, 24, 18, 24, 21]
    ok = pq.score_teacher_forced(list(gold), gold)
    assert ok["correct"] and ok["token_acc"] == 1.0 and ok["n_wrong"] == 0
    bad = list(gold)
    bad[4] = 19  # one digit off
    r = pq.score_teacher_forced(torch.tensor(bad), torch.tensor(gold))
    assert not r["correct"]
    assert r["n_wrong"] == 1 and r["token_acc"] == pytest.approx(7 / 8)
    assert r["first_ok"] and r["hits"][4] is False
    with pytest.raises(ValueError, match="pred"):
        pq.score_teacher_forced(gold[:-1], gold)
    with pytest.raises(ValueError, match="answer"):
        pq.score_teacher_forced([], [])


class _NextTokenModel(torch.nn.Module):
    """Hand-made 'model': the logits at position i put all mass on token ``input_ids[i] + 1``."""

    def __init__(self, vocab: int = 50):
        super().__init__()
        self.vocab = vocab
        self.calls = []

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        self.calls.append((tuple(input_ids.shape), use_cache, logits_to_keep))
        lg = torch.full((*input_ids.shape, self.vocab), -10.0)
        lg.scatter_(-1, ((input_ids + 1) % self.vocab)[..., None], 10.0)
        if logits_to_keep:
            lg = lg[:, -logits_to_keep:]
        return SimpleNamespace(logits=lg)


def test_teacher_forced_predict_reads_the_answer_positions():
    model = _NextTokenModel()
    prompt = [3, 9, 4]
    answer = [5, 6, 7, 8]  # each token is the previous + 1: the hand model predicts all of them
    pred = pq.teacher_forced_predict(model, prompt, answer, "cpu")
    assert pred.tolist() == answer
    assert model.calls == [((1, 7), False, 5)]  # ONE forward over prompt + answer, no cache
    assert pq.score_teacher_forced(pred, answer)["correct"]
    wrong_gold = [5, 6, 9, 8]  # the model's own prediction for the third digit is 7
    pred = pq.teacher_forced_predict(model, prompt, wrong_gold, "cpu")
    r = pq.score_teacher_forced(pred, wrong_gold)
    assert not r["correct"] and r["n_wrong"] == 2  # position of '9' and the one after it (9 + 1 != 8)


def test_hidden_needle_fails_teacher_forcing_on_the_bundled_model(bundled):
    model, tok = bundled
    torch.manual_seed(0)
    s = pq.make_prompts(tok, "passkey", 512, 3, seed=11)[1]  # depth 0.5: the needle is ~250 tokens back
    assert s.depth == 0.5 and len(s.answer_ids) == 8
    dense = pq.run_passkey(model, tok, None, [s], device="cpu", backend="reference")[0]
    assert dense["acc"] == 100.0 and dense["density"] == 1.0
    # sinks + a 32-token window: the answer rows cannot see the needle in any layer
    hide = pq.Setting("a_shape", 0.1, 512, "sink4+local32", {"n_init": 4, "n_local": 32, "block_size": 64})
    agg, rows = pq.run_passkey(model, tok, hide, [s], device="cpu", backend="reference")
    assert agg["acc"] == 0.0 and rows[0]["correct"] == 0 and rows[0]["token_acc"] < 1
    assert 0.05 < agg["density"] < 0.15  # recorded from the patterns of that forward


def test_teacher_forced_ids_refuses_a_merging_boundary(bpe_tok):
    p, a = pq.teacher_forced_ids(bpe_tok, "The special magic number is", "1234567")
    assert len(a) >= 1 and bpe_tok.encode("The special magic number is 1234567").ids == p + a
    with pytest.raises(ValueError, match="answer"):
        pq.teacher_forced_ids(bpe_tok, "x", "")


# ----------------------------------------------------------------------------------------------
# density search
# ----------------------------------------------------------------------------------------------

def test_search_knob_integer_float_and_decreasing():
    r = pq.search_knob(lambda x: x / 1000, 0.05, lo=1, hi=1000, guess=3, integer=True)
    assert r.met and r.x == 50 and len(r.evals) <= 4
    r = pq.search_knob(lambda x: min(1.0, x ** 1.5), 0.1, lo=1e-3, hi=1.0, guess=0.9, integer=False)
    assert r.met and abs(r.density - 0.1) <= 0.01
    r = pq.search_knob(lambda x: 1.0 / x, 0.1, lo=2, hi=64, guess=2, integer=True, increasing=False)
    assert r.met and r.x == 10
    # a step function that never reaches the band: the closest value, within the budget of evaluations
    r = pq.search_knob(lambda x: 0.2 * (x // 10), 0.1, lo=1, hi=100, guess=5, integer=True, max_evals=6)
    assert not r.met and r.density in (0.0, 0.2) and len(r.evals) <= 6
    with pytest.raises(ValueError, match="target"):
        pq.search_knob(lambda x: x, 0.0, lo=1, hi=2, guess=1, integer=True)


def _synthetic_capture(T=4096, Hq=2, Hkv=1, D=16, seed=0) -> pq.Captured:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, T, D, generator=g)
    k = torch.randn(1, Hkv, T, D, generator=g)
    k[:, :, :4] += 3 * q[:, :1, :4].mean(2, keepdim=True)  # a few attention sinks: some structure to find
    v = torch.randn(1, Hkv, T, D, generator=g)
    return pq.Captured({0: (q, k, v, q, k)}, {0: D ** -0.5}, T)


@pytest.mark.parametrize("method", ["a_shape", "block_sparse", "oracle_topk", "s2_attention", "vertical_slash", "hip"])
def test_density_search_hits_the_target_on_synthetic_qk(method):
    from sparsattn.methods import get_method

    cap = _synthetic_capture()
    target = 0.1
    fam = pq.knob_family(method, 4096, target)
    r = pq.search_knob(lambda x: pq.measure_density(get_method(method, **fam.config(x)), cap)[0], target,
                       lo=fam.lo, hi=fam.hi, guess=fam.guess, integer=fam.integer, increasing=fam.increasing,
                       tol=0.1)
    assert r.met, (method, r)
    # the recorded density is the pattern's own, re-measured
    d, per = pq.measure_density(get_method(method, **fam.config(r.x)), cap)
    assert d == pytest.approx(r.density) and abs(d - target) <= 0.1 * target


def test_razor_subset_keeps_top_induction_heads(tmp_path):
    from sparsattn.methods import get_method

    src = pq._calibration_dir() / "razor.json"
    out = pq.razor_subset(str(src), 3, str(tmp_path / "r3.json"))
    doc = json.loads(Path(out).read_text())
    kept = [(int(l), h) for l, d in doc["data"].items() for h in d["retrieval_heads"]]
    by = "retrieval" if all(d.get("retrieval") for d in doc["data"].values()) else "induction"  # issue 21
    scores = sorted(((s, int(l), h) for l, d in doc["data"].items() for h, s in enumerate(d[by])),
                    reverse=True)
    assert sorted(kept) == sorted((l, h) for _, l, h in scores[:3])
    m = get_method("razor", path=out, min_window=64, compression=1e6)
    assert sum(len(v) for v in m.retrieval_heads.values()) == 3
    with pytest.raises(ValueError, match="n_heads"):
        pq.razor_subset(str(src), 0, str(tmp_path / "r0.json"))


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------

def test_summary_table_and_plots_are_written(tmp_path):
    lengths = [4096, 8192]
    settings = [pq.Setting("a_shape", t, L, f"sink{L}", {"n_init": 4, "n_local": 10}, density_cal=t, target_met=True)
                for t in (0.05, 0.1) for L in lengths]
    settings.append(pq.Setting("minference", None, 8192, "shipped plan", {"path": "x.json"}, density_cal=0.2))
    passkey = [{"method": "sdpa_dense", "target": "reference", "length": L, "task": "passkey", "acc": 100.0,
                "token_acc": 100.0, "density": 1.0} for L in lengths]
    passkey += [{"method": s.method, "target": s.target_name, "length": s.length, "task": "passkey",
                 "acc": 40.0 + 100 * (s.target or 0.3), "token_acc": 90.0, "density": s.density_cal} for s in settings]
    fid = {s.key: {"recall": 0.8 + (s.target or 0.1), "topk_recall": 0.7, "rel_error": 0.3, "density": s.density_cal,
                   "min_layer_recall": 0.6} for s in settings}
    speed_csv = tmp_path / "methods_bench.csv"
    speed_csv.write_text('T,method,config,density,speedup_end_to_end,error\n'
                         '32768,a_shape,"{\'n_init\': 128, \'n_local\': 819}",0.057,3.5,\n'
                         '32768,hip,"{}",,,ValueError: x\n')
    speed = pq.read_speed(speed_csv)
    assert speed == {"a_shape": {32768: 3.5}}
    summary = pq.summarize(settings, passkey, fid, lengths, 8192, speed)
    assert [r["method"] for r in summary] == ["sdpa_dense", "a_shape", "a_shape", "minference"]
    a5 = summary[1]
    assert a5["acc_4096"] == 45.0 and a5["acc_mean"] == 45.0 and a5["speedup_32768"] == 3.5
    assert summary[3]["acc_8192"] == 70.0 and "acc_4096" not in summary[3]
    pq.write_csv(summary, tmp_path / "summary.csv")
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[1]["recall"] == "0.85"
    text = pq.write_table(summary, tmp_path / "table.md", lengths, 8192, "header line\n")
    lines = [x for x in text.splitlines() if x.startswith("|")]
    assert len(lines) == 2 + len(summary)
    assert "| `minference` | calibrated |" in text and "not run" in text  # minference has no 4096 row
    png = pq.plot_pareto(summary, tmp_path / "pareto.png", lengths, "t")
    sp = pq.plot_speedup(summary, speed, tmp_path / "speedup.png", "t")
    for p in (png, sp):
        assert p is not None and p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="speed"):
        bad = tmp_path / "bad.csv"
        bad.write_text("a,b\n1,2\n")
        pq.read_speed(bad)


def test_run_end_to_end_tiny(tmp_path, bundled):
    out = tmp_path / "pq"
    summary = pq.run(out, lengths=[256], densities=[0.1], n=1, methods=["dense", "a_shape"], fid_prompt="passkey",
                     moa_fit=False)
    for name in ("settings.csv", "passkey.csv", "passkey_samples.csv", "fidelity_layers.csv", "summary.csv",
                 "table.md", "pareto.png", "env.json"):
        assert (out / name).is_file(), name
    with open(out / "fidelity_layers.csv") as f:
        fl = list(csv.DictReader(f))
    assert {r["method"] for r in fl} == {"dense", "a_shape"} and len(fl) == 2 * 8  # every layer
    a = next(r for r in summary if r["method"] == "a_shape")
    assert abs(a["density_pk_256"] - 0.1) <= 0.02 and 0 < a["recall"] < 1
    env = json.loads((out / "env.json").read_text())
    assert env["args"]["lengths"] == [256] and "passkey_s" in env["timings"]
    # replot (no measurement) adds the benchmark's speed-ups, the speed-up plot, and keeps the table's header
    speed = tmp_path / "bench.csv"
    speed.write_text("T,method,speedup_end_to_end\n32768,a_shape,2.5\n131072,a_shape,7.0\n")
    before = (out / "table.md").read_text()
    again = pq.replot(out, str(speed))
    assert next(r for r in again if r["method"] == "a_shape")["speedup_131072"] == 7.0
    assert (out / "speedup.png").is_file() and (out / "table.md").read_text() == before
    with pytest.raises(ValueError, match="methods"):
        pq.run(out, lengths=[256], methods=["quest"])
