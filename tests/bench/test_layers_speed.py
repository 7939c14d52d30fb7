"""The layer speed sweep (issue 18): a CPU smoke run and the crossover rule."""
import csv

from sparsattn.bench import layers as bl


def test_crossover_is_the_first_length_faster_from_then_on():
    rows = [dict(layer="a", T=t, speedup=s) for t, s in ((4096, 0.5), (16384, 1.2), (65536, 0.9), (262144, 3.0))]
    rows += [dict(layer="b", T=t, speedup=s) for t, s in ((4096, 0.8), (16384, 1.1), (65536, 2.0))]
    rows += [dict(layer="c", T=4096, speedup=0.7), dict(layer="d", T=4096, speedup="")]
    assert bl.crossovers(rows) == {"a": 262144, "b": 16384, "c": None}


def test_cpu_sweep_writes_rows_with_a_same_run_baseline(tmp_path):
    out = tmp_path / "speed.csv"
    rows = bl.run(["dense", "halo"], [64], out=out, dim=32, heads=2, device="cpu", long_lengths=[144],
                  long_kinds=("sparse",))
    got = list(csv.DictReader(open(out)))
    assert [(r["layer"], r["T"]) for r in got] == [("dense", "64"), ("dense", "144"), ("halo", "64"), ("halo", "144")]
    for r in rows:
        assert r["status"] == "ok" and r["layer_ms"] > 0 and r["dense_ms"] > 0
        assert abs(r["speedup"] - r["dense_ms"] / r["layer_ms"]) < 1e-3 * r["speedup"] + 1e-4
