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
    assert [r["method"] for r in rows] == ["block_sparse", "s2_attention", "longheads"]
    assert all("error" not in r and 0 < r["density"] <= 1 for r in rows), rows
    assert set(method_configs(131072)) >= {"a_shape", "vertical_slash", "block_sparse", "hip"}
