"""Benchmark harnesses run end to end on tiny sizes (CPU) and write their result files."""
import csv

from sparsattn.bench.methods import method_configs, run_methods_bench
from sparsattn.bench.prefill import run_prefill_bench


def test_prefill_bench_tiny(tmp_path):
    rows = run_prefill_bench(tiny=True, out_dir=tmp_path, backward=False, progress=False)
    assert {r["pattern"] for r in rows} >= {"causal", "random5%"}
    got = list(csv.DictReader(open(tmp_path / "prefill.csv")))
    assert len(got) == len(rows) and all(float(r["ours_fwd_ms"]) > 0 for r in got)
    assert (tmp_path / "prefill_env.json").exists()


def test_methods_bench_tiny(tmp_path):
    rows = run_methods_bench(tiny=True, out_dir=tmp_path, methods=["s2_attention", "block_sparse", "longheads"])
    assert [r["method"] for r in rows] == ["block_sparse", "longheads", "s2_attention"]  # registry order
    assert all("error" not in r and 0 < r["density"] <= 1 for r in rows), rows
    skipped: dict = {}
    cfgs = method_configs(131072, skipped=skipped)
    assert set(cfgs) >= {"a_shape", "vertical_slash", "block_sparse", "hip"}
    assert "dense" in skipped and "razor" in skipped  # no knob / no calibration given: left out, with the reason


def test_methods_bench_times_a_calibrated_method_on_a_random_calibration(tmp_path):
    """SeerAttention has no trained gate for the benchmark's shape: it is timed on a random gate
    (``Calibrated.random_calibration``) instead of being special-cased by name."""
    rows = run_methods_bench(tiny=True, out_dir=tmp_path, methods=["seer_attention"])
    assert [r["method"] for r in rows] == ["seer_attention"]
    assert "error" not in rows[0] and 0 < rows[0]["density"] <= 1, rows
