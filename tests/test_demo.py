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
    # quick mode, at 1K tokens instead of 4K and the prefill timed at 512 tokens instead of 8K, to keep
    # the test fast (below the flex backend's CPU length rule: the reference, nothing compiles)
    assert demo.model_demo(out, quick=True, progress=False, lengths=[1024], speed_lengths=[512]) == 0
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"  # restored
    text = capsys.readouterr().out
    assert text.count("sparsattn demo: passkey") == 1
    assert "sparsattn eval grid" not in text  # one table: run_eval's own table is not printed
    assert "sparse-decided" in text  # the teacher-forced column
    notes = {**demo.COLUMN_NOTES, **demo.speed_notes([512])}
    for col, note in notes.items():  # one line of explanation per column under the table
        assert f"  {col}: {note}" in text
    assert "speed-up 0K" in text and "prefill 0K s" in text  # the speed columns (512 tokens -> "0K")
    assert "1/1" in text or "0/1" in text  # counts, not a 0/100 percentage of one sample
    cfgs = demo.demo_configs(1024)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as model_demo runs it on the CPU
    forced, speed = demo._teacher_forced_passkey(path, cfgs, [1024], 1, "cpu", speed_lengths=[256])
    assert set(forced) == {(m, 1024) for m in demo.DEMO_METHODS}
    assert {k for k in speed if k[0] != "_compile"} == {(m, 256) for m in demo.DEMO_METHODS}
    assert speed[("_compile", 256)] == 0  # below CPU_MIN_Q_LEN: no flex, nothing compiled
    assert speed[("dense", 256)]["speedup"] == 1.0
    for m in demo.DEMO_METHODS[1:]:
        sp = speed[(m, 256)]
        assert sp["seconds"] > 0 and sp["speedup"] > 0 and sp["backend"] == "reference" and sp["fallbacks"] == 0
        assert 0 < sp["density"] <= 1
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
    # the presets aim at DEMO_DENSITY (20 %) at 1K; position-only patterns land near it
    assert 0.1 < dens["a_shape"] < 0.35
    assert 0.1 < dens["s2_attention"] < 0.45
    assert all(d < 1.0 for m, d in dens.items() if m != "dense")


def test_demo_configs_come_from_the_method_presets(monkeypatch):
    """No per-method settings in the demo: each config is the method's density_knob preset."""
    from sparsattn.methods import method_class
    from sparsattn.methods.base import PresetContext

    cfgs = demo.demo_configs(4096)
    assert list(cfgs) == list(demo.DEMO_METHODS) and cfgs["dense"] == {}
    for name in demo.DEMO_METHODS[1:]:
        knob = method_class(name).density_knob(4096, demo.DEMO_DENSITY, PresetContext())
        assert cfgs[name] == knob.config(knob.guess)
    # a method's preset change reaches the demo without editing it
    cls = method_class("a_shape")
    real = cls.density_knob
    monkeypatch.setattr(cls, "density_knob", classmethod(
        lambda c, T, target, ctx: type(real(T, target, ctx))(**{**real(T, target, ctx).__dict__,
                                                                  "config": lambda x: {"n_init": 8, "n_local": 99}})))
    assert demo.demo_configs(4096)["a_shape"] == {"n_init": 8, "n_local": 99}


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


def test_demo_methods_come_from_the_registry():
    """The demo's methods are the registered prefill methods declaring ``demo = True`` (exact first):
    a new one joins without a demo edit."""
    from dataclasses import dataclass

    from sparsattn import demo
    from sparsattn.methods import base as mb
    from sparsattn.methods import method_class

    assert demo.DEMO_METHODS[0] == "dense" and all(method_class(n).demo for n in demo.DEMO_METHODS)

    @dataclass
    class _Shown(method_class("a_shape")):
        demo = True

    mb.register("_throwaway_demo")(_Shown)
    try:
        assert "_throwaway_demo" in demo._demo_methods()
    finally:
        mb._REGISTRY.pop("_throwaway_demo", None)
    assert "_throwaway_demo" not in demo._demo_methods()
