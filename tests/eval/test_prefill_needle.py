"""Needle coverage in the prefill quality driver (issue 21): needle positions, the diagnostics a
calibration module declares (SeerAttention's gate block recall), --method-config overrides, and a
tiny run on the bundled model with a held-out haystack."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from sparsattn.eval import prefill_quality as pq
from sparsattn.eval.prefill_needle import diagnosers, needle_positions


class _DigitTok:
    """ids < 10 decode to their digit, 10 to a blank, the rest to letters."""

    def decode(self, ids):
        return "".join(str(i) if i < 10 else (" " if i == 10 else "x") for i in ids)


def test_needle_positions_last_occurrence_and_answer_rows():
    prompt = [11, 3, 1, 4, 12, 3, 1, 4, 13, 14]
    needle, rows = needle_positions(_DigitTok(), prompt, [10, 3, 1, 4])  # " 314": the blank is not the needle
    assert needle == [5, 6, 7] and rows == [9, 10, 11, 12]  # rows P-1 .. P+len(answer)-2 predict the answer
    assert needle_positions(_DigitTok(), prompt, [10, 9, 9]) is None
    with pytest.raises(ValueError, match="answer_ids"):
        needle_positions(_DigitTok(), prompt, [])


class _ExactGate:
    """A stand-in SeerAttention whose gate ranks key blocks by the exact block-max attention
    (``sign=-1``: the reverse ranking)."""

    def __init__(self, sign=1.0, block=16):
        self.sign, self.gate, self.needs_pre_rope = sign, type("G", (), {"block_size": block})(), False

    def block_logits(self, q, k, ctx):
        from sparsattn.kernels import estimate

        bs = self.gate.block_size
        return self.sign * estimate.exact_block_scores(q, k, bs, bs, scale=ctx.scale, causal=True, reduce="max")


def test_gate_block_recall_is_one_for_the_oracle_ranking_and_lower_reversed():
    from sparsattn.calibrate.seer_attention import diagnostics, gate_block_recall  # importable from its home

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 200, 8, generator=g), torch.randn(1, 2, 200, 8, generator=g)
    layers, scales = {0: (q, k, k, None, None), 1: (q * 2, k, k, None, None)}, {0: 0.35, 1: 0.35}
    assert gate_block_recall(_ExactGate(), layers, scales, 3) == [1.0, 1.0]
    rev = gate_block_recall(_ExactGate(-1.0), layers, scales, 3)
    assert all(0.0 <= r < 0.5 for r in rev)
    with pytest.raises(ValueError, match="k_per_row"):
        gate_block_recall(_ExactGate(), layers, scales, 0)
    assert diagnostics(_ExactGate(), layers, scales) == {}  # no nz_ratio: threshold mode has no fixed k
    assert set(diagnosers(["seer_attention", "a_shape", "oracle_topk"])) == {"seer_attention"}  # from the registry


def test_method_config_overrides_every_configuration(tmp_path):
    g = torch.Generator().manual_seed(1)
    T = 512
    q, k = torch.randn(1, 2, T, 16, generator=g), torch.randn(1, 2, T, 16, generator=g)
    cap = pq.Captured({0: (q, k, k, q, k)}, {0: 0.25}, T)
    plain, = pq.resolve_settings(["oracle_topk"], [0.2], T, cap, n_layers=1, n_heads=2, out_dir=tmp_path,
                                 calibrations={})
    over, = pq.resolve_settings(["oracle_topk"], [0.2], T, cap, n_layers=1, n_heads=2, out_dir=tmp_path,
                                calibrations={}, overrides={"oracle_topk": {"top_k": 2, "density": None}})
    assert plain.config["top_k"] is None and over.config["top_k"] == 2 and over.config["density"] is None
    assert "+top_k=2" in over.label and "--method-config" in over.note
    assert over.density_cal == pytest.approx(pq.measure_density(over.build(), cap)[0])  # measured with it
    assert over.density_cal != pytest.approx(plain.density_cal)
    # a density variant: the oracle with the same number of blocks in every row (knob top_k)
    uni, = pq.resolve_settings(["oracle_topk:uniform"], [0.2], T, cap, n_layers=1, n_heads=2, out_dir=tmp_path,
                               calibrations={})
    assert uni.method == "oracle_topk:uniform" and uni.config["density"] is None and uni.label.endswith("per row")
    from sparsattn.methods import get_method

    kk = uni.config["top_k"]
    near = [pq.measure_density(get_method("oracle_topk", **dict(uni.config, top_k=j)), cap)[0] for j in (kk, kk + 1)]
    assert near[0] == pytest.approx(uni.density_cal) and abs(near[0] - 0.2) <= abs(near[1] - 0.2)  # the closest k
    with pytest.raises(ValueError, match="overrides"):
        pq.resolve_settings(["oracle_topk"], [0.2], T, cap, n_layers=1, n_heads=2, out_dir=tmp_path,
                            calibrations={}, overrides={"oracle_topk": 3})


def test_tiny_run_reports_needle_coverage_on_held_out_haystacks(tmp_path, bundled):
    out = tmp_path / "pq"
    summary = pq.run(out, lengths=[256], densities=[0.1], n=2, methods=["dense", "a_shape", "seer_attention:threshold"],
                     fid_prompt="passkey",
                     refit=False, haystack="code", seed=pq.HELDOUT_SEED)
    with open(out / "passkey.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    with open(out / "passkey.csv") as f:
        cols = next(csv.reader(f))
    # the new columns come after the old ones
    assert cols.index("needle_reading") > cols.index("seconds")
    ref, dense, ash = rows["sdpa_dense"], rows["dense"], rows["a_shape"]
    n_read = int(ref["needle_reading"])
    assert n_read > 0 and int(ref["needle_kept"]) == n_read and float(ref["needle_coverage"]) == 1.0
    assert int(dense["needle_reading"]) == n_read == int(dense["needle_kept"])  # a full pattern keeps them all
    # sink 4 + a ~9-token window at 10% of 256 tokens cannot see a needle at depth 0 or 1 of the haystack
    assert int(ash["needle_reading"]) == n_read and int(ash["needle_kept"]) < n_read
    assert 0.0 <= float(ash["needle_kept_fraction"]) < 0.5 and int(ash["needle_missing"]) == 0
    doc = json.loads((out / "needle.json").read_text())
    a = next(r for r in doc["rows"] if r["method"] == "a_shape")
    assert len(a["samples"]) == 2 and sum(s["needle_reading"] for s in a["samples"]) == n_read
    assert all(len(h) == 5 and 0.1 <= h[2] <= 1.0 for s in a["samples"] for h in s["heads"])  # mass >= threshold
    with open(out / "passkey_samples.csv") as f:
        samples = [r for r in csv.DictReader(f) if r["method"] == "a_shape"]
    assert sum(int(r["needle_kept"]) for r in samples) == int(ash["needle_kept"])
    s = next(r for r in summary if r["method"] == "a_shape")
    assert s["needle_reading_256"] == n_read and s["needle_cov_256"] == pytest.approx(int(ash["needle_kept"]) / n_read)
    table = (out / "table.md").read_text()
    assert "needle kept 256 (heads)" in table and f"| {n_read}/{n_read} |" in table and "Haystack: code" in table
    env = json.loads((out / "env.json").read_text())
    assert env["args"]["haystack"] == "code" and "haystack='code'" in env["protocol"]["passkey"]
    # a density variant (the method's density_variants preset): SeerAttention's gate in threshold mode
    thr = rows["seer_attention:threshold"]
    assert thr["setting"].startswith("thr") and int(thr["needle_reading"]) == n_read
    with open(out / "settings.csv") as f:
        cfg = json.loads(next(r for r in csv.DictReader(f) if r["method"] == "seer_attention:threshold")["config"])
    assert cfg.get("nz_ratio") is None and 0 < cfg["threshold"] < 1 and cfg["last_block_dense"] is False
    for bad in ("seer_attention:bogus", "a_shape:threshold", "nope"):
        with pytest.raises(ValueError, match="methods"):
            pq.run(out, lengths=[256], methods=[bad])
    with pytest.raises(ValueError, match="haystack"):
        pq.run(out, lengths=[256], methods=["dense"], haystack="poetry")
    with pytest.raises(ValueError, match="needle_keep"):
        pq.run(out, lengths=[256], methods=["dense"], needle_keep=0)


def test_retrieval_check_plans_driver_runs_from_specs(tmp_path):
    from sparsattn.eval import retrieval_check as rc

    cal = {"shipped": "S", "new": "N"}
    plan = rc.plan_runs(["razor@new", "seer_attention:threshold", "oracle_topk:d0.055", "oracle_topk", "minference@new",
                         "oracle_topk:uniform"], 0.12, cal)
    assert plan == {("new", 0.12): ["razor", "minference"], ("shipped", 0.12): ["seer_attention:threshold", "oracle_topk",
                                                                                  "oracle_topk:uniform"],
                    ("shipped", 0.055): ["oracle_topk"]}
    for bad, what in (("razor@nowhere", "calibration folder"), ("oracle_topk:k4", "density variants"),
                      ("oracle_topk:d1.5", "density")):
        with pytest.raises(ValueError, match=what):
            rc.plan_runs([bad], 0.1, cal)
    doc = {"rows": [{"method": "sdpa_dense", "length": 256, "n": 2, "correct": 2, "density": 1.0, "coverage": 1.0},
                    {"method": "a_shape", "length": 256, "n": 2, "correct": 0, "density": 0.1, "coverage": float("nan")}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    png = rc.plot([str(tmp_path / "c.json")], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and png.endswith("c.png")


def test_two_fixed_settings_of_one_method_keep_apart(tmp_path, monkeypatch):
    """A method declaring two fixed settings of one target (MoA's file with plans of two budgets) gets
    two rows: the second is named by its label, the first keeps the old name."""
    from sparsattn.methods.a_shape import AShape
    from sparsattn.methods.base import FixedSetting

    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 256, 8, generator=g)
    cap = pq.Captured({0: (q, q, q, q, q)}, {0: 0.35}, 256)
    monkeypatch.setattr(AShape, "fixed_settings", classmethod(
        lambda cls, T, ctx: [FixedSetting("plan A", {"n_init": 4, "n_local": 16}),
                             FixedSetting("plan B", {"n_init": 4, "n_local": 64})]))
    ss = [s for s in pq.resolve_settings(["a_shape"], [0.2], 256, cap, n_layers=1, n_heads=1, out_dir=tmp_path,
                                         calibrations={}) if s.target is None]
    assert [s.target_name for s in ss] == ["calibrated", "plan B"] and len({s.key for s in ss}) == 2
    assert ss[0].density_cal < ss[1].density_cal
