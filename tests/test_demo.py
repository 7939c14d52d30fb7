"""sparsattn.demo.model_demo in quick mode on a tiny random Llama standing in for the bundled model."""
from __future__ import annotations

import csv

import pytest
import torch

import sparsattn.models
from sparsattn import demo

from .test_evaluate import make_tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="the demo is the CPU path run with TRITON_INTERPRET=1, which `sparsattn demo` sets before "
                           "any kernel is imported; in a CUDA test process the kernels were already compiled for the "
                           "GPU and the interpreter cannot be switched on afterwards")
def test_quick_demo_on_tiny_model(tmp_path, monkeypatch, capsys):
    path = make_tiny_model(tmp_path / "bundled", layers=2, max_pos=8192)
    monkeypatch.setattr(sparsattn.models, "bundled_path", lambda: path)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as the CLI sets it; the demo must use the reference on CPU
    out = tmp_path / "demo"
    # quick mode, at 1K tokens instead of 4K to keep the test fast (the reference kernel is O(T^2) on CPU)
    assert demo.model_demo(out, quick=True, progress=False, lengths=[1024]) == 0
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"  # restored
    text = capsys.readouterr().out
    assert text.count("sparsattn demo: passkey") == 1
    assert "sparsattn eval grid" not in text  # one table: run_eval's own table is not printed
    assert "sparse-decided" in text  # the teacher-forced column
    for col, note in demo.COLUMN_NOTES.items():  # one line of explanation per column under the table
        assert f"  {col}: {note}" in text
    assert "1/1" in text or "0/1" in text  # counts, not a 0/100 percentage of one sample
    forced = demo._teacher_forced_passkey(path, demo.DEMO_METHODS, [1024], 1, "cpu")
    assert set(forced) == {(m, 1024) for m in demo.DEMO_METHODS}
    for v in forced.values():
        assert v["n"] == 1 and 0 <= v["correct"] <= 1 and 0 <= v["tokens_right"] <= v["tokens"] and v["tokens"] >= 1
    for m in demo.DEMO_METHODS:
        assert m in text
    assert (out / "demo.png").stat().st_size > 1000
    with open(out / "eval.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == list(demo.DEMO_METHODS)
    assert {r["length"] for r in rows} == {"1024"} and {r["n_samples"] for r in rows} == {"1"}
    dens = {r["method"]: float(r["density"]) for r in rows}
    assert dens["dense"] == 1.0
    for r in rows:
        assert r["recall"] != "" and 0.0 <= float(r["recall"]) <= 1.0
    # position-only patterns have a known density at 1K: a_shape 512 keys per row, S2 4 local blocks
    # + every 8th block
    assert 0.5 < dens["a_shape"] < 0.9
    assert 0.3 < dens["s2_attention"] < 0.8
    assert all(d < 1.0 for m, d in dens.items() if m != "dense")


def test_demo_scores_generated_passkeys_exactly(tmp_path):
    """A generated 72894720 is not the passkey 7289472 (RULER's substring match counts it)."""
    p = tmp_path / "eval_samples.csv"
    with open(p, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["method", "task", "length", "sample", "depth", "n_tokens", "score", "answers",
                                "prediction"])
        w.writeheader()
        for i, pred in enumerate(["72894720", " 7289472.", "the key is 7289472", "1234"]):
            w.writerow({"method": "a_shape", "task": "passkey", "length": 4096, "sample": i, "depth": 0.5,
                        "n_tokens": 4090, "score": 0, "answers": "7289472", "prediction": pred})
    assert demo._generated_counts(p) == {("a_shape", 4096): (2, 3, 4)}
