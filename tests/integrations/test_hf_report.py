"""The patch report (issue 16, "say what ran"): densities per layer and head, selection times, fallbacks."""
from __future__ import annotations

import logging

import pytest
import torch

import sparsattn
from sparsattn.integrations import hf
from sparsattn.integrations.hf.report import PatchReport, report_of
from sparsattn.methods import get_method, method_class  # noqa: F401

from hf_testutil import make_model

T = 160  # five 32-token blocks: the configs below are sparse at this length
CONFIGS = {"a_shape": {"n_init": 20, "n_local": 40, "block_size": 32}, "block_sparse": {"top_k": 2, "block_size": 32}}


def _ids(T=T, B=1):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["a_shape", "block_sparse"])
def test_report_densities_match_the_method_patterns(name):
    model = make_model("llama")
    ids = _ids()
    from sparsattn.capture import capture_qkv

    caps = capture_qkv(model, ids)
    cfg = CONFIGS[name]
    with torch.no_grad(), sparsattn.patched(model, method=name, **cfg) as report:
        model(ids)
    assert isinstance(report, PatchReport) and report.model is model
    assert report.n_fallbacks == 0
    m = get_method(name, **cfg)
    for layer, (q, k, v) in caps.items():
        st = report.stats[(layer, "prefill")]
        assert st.calls == 1 and st.method == name and st.tokens == (T, T) and st.seconds > 0
        assert list(st.backends) == ["reference"]  # the tests' DEFAULT_BACKEND on the CPU
        comp, ref = m.select(q, k, None).pair_counts()
        want = (comp / ref).mean(0)  # per pattern head
        want = want.repeat_interleave(q.shape[1] // want.shape[0]).tolist()
        assert st.densities == pytest.approx(want, abs=1e-9)
        assert len(st.densities) == q.shape[1] == 4
        assert 0 < st.density < 1
    assert report.density() == pytest.approx(sum(report.density(l) for l in caps) / len(caps))
    text = report.summary()
    assert "sparsattn patch report" in text and "0 fallback(s)" in text
    for layer in caps:
        assert any(line.split()[:3] == [str(layer), "prefill", name] for line in text.splitlines())


def test_fallback_recorded_with_reason_and_warned_once(caplog):
    model = make_model("llama")
    ids = _ids(B=2)
    holes = torch.ones(2, T, dtype=torch.long)
    holes[0, 10:20] = 0  # neither left nor right padding: the layers fall back to dense
    with caplog.at_level(logging.DEBUG, logger="sparsattn"):
        with torch.no_grad(), sparsattn.patched(model, method="a_shape", **method_class("a_shape").small_config()) as rep:
            model(ids, attention_mask=holes)
            model(ids, attention_mask=holes)
    fb = [r for r in caplog.records if "dense attention fallback" in r.getMessage()]
    assert len(fb) == 2 * 4  # every layer, both forwards
    warned = [r for r in fb if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "padding mask has holes" in warned[0].getMessage()
    assert "layer 0" in warned[0].getMessage()
    assert rep.n_fallbacks == 8
    assert {(f.layer, f.phase, f.reason, f.count) for f in rep.fallbacks.values()} == {
        (l, "prefill", "padding mask has holes (neither left nor right padding)", 2) for l in range(4)}
    assert not rep.stats  # no selection ran
    text = rep.summary()
    assert "8 fallback(s)" in text and "padding mask has holes" in text
    # a new run warns again (once)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="sparsattn"):
        with torch.no_grad(), sparsattn.patched(model, method="a_shape", **method_class("a_shape").small_config()):
            model(ids, attention_mask=holes)
    assert sum(r.levelno == logging.WARNING for r in caplog.records if "fallback" in r.getMessage()) == 1


def test_plain_patch_keeps_a_report_of_fallbacks_only(capsys):
    model = make_model("llama")
    hf.patch(model, "a_shape", **method_class("a_shape").small_config())
    try:
        rep = report_of(model)
        assert rep is not None and not rep.detailed
        with torch.no_grad():
            model(_ids())
        assert not rep.stats and rep.n_fallbacks == 0
        assert "recorded under sparsattn.patched" in rep.summary()
    finally:
        hf.unpatch(model)
    assert report_of(model) is None


def test_summary_plain_text_without_rich(monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_rich(name, *a, **kw):
        if name == "rich" or name.startswith("rich."):
            raise ImportError("no rich")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    model = make_model("llama")
    with torch.no_grad(), sparsattn.patched(model, method="a_shape", **method_class("a_shape").small_config()) as rep:
        model(_ids())
    text = rep.summary()
    out = capsys.readouterr().out
    assert out.strip() == text.strip()
    header = text.splitlines()[1].split()
    assert header[:4] == ["layer", "phase", "method", "backend"] and "density" in header


def test_static_patterns_are_built_once_per_forward(monkeypatch):
    """A method whose pattern depends only on the lengths (static_pattern_key) selects once per forward,
    not once per layer; every layer still records it (and its density)."""
    model = make_model("llama")
    cls = method_class("a_shape")
    calls = []
    real = cls.select
    monkeypatch.setattr(cls, "select", lambda self, q, k, ctx=None: calls.append(ctx.layer) or real(self, q, k, ctx))
    with torch.no_grad(), sparsattn.patched(model, method="a_shape", **CONFIGS["a_shape"]) as rep:
        model(_ids())
        model(_ids())
    assert calls == [0, 0]  # layer 0 of each forward builds it, layers 1-3 reuse it
    assert {l for l, _ in rep.stats} == {0, 1, 2, 3} and all(s.calls == 2 for s in rep.stats.values())
    d = [s.density for s in rep.stats.values()]
    assert max(d) == min(d)


def test_cpu_prefill_picks_flex_automatically_and_the_report_says_so(monkeypatch):
    """From CPU_MIN_Q_LEN tokens the table picks flex on the CPU (here Flex uncompiled, same semantics:
    a CPU compile takes tens of seconds); the outputs equal the reference backend's."""
    from torch.nn.attention.flex_attention import flex_attention

    from sparsattn.kernels import backends
    from sparsattn.kernels.block_sparse import flex

    if torch.cuda.is_available() or backends._cpp_compiler() is None:
        pytest.skip("the CPU flex rule needs a CPU run with a C++ compiler")
    monkeypatch.setitem(flex._COMPILED, "fn", flex_attention)
    monkeypatch.setattr(flex, "_CPU_SHAPES", set())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(hf, "DEFAULT_BACKEND", None)
    T = flex.CPU_MIN_Q_LEN
    model = make_model("llama", num_hidden_layers=2, max_position_embeddings=T)
    ids = _ids(T)
    cfg = {"n_init": 16, "n_local": 128, "block_size": 64}
    with torch.no_grad():
        with sparsattn.patched(model, method="a_shape", **cfg) as rep:
            auto = model(ids).logits
        with sparsattn.patched(model, method="a_shape", backend="reference", **cfg) as rep_ref:
            ref = model(ids).logits
    assert {b for s in rep.stats.values() for b in s.backends} == {"flex"}
    assert {b for s in rep_ref.stats.values() for b in s.backends} == {"reference"}
    torch.testing.assert_close(auto, ref, atol=1e-4, rtol=1e-4)
