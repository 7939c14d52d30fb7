"""The evaluation drivers read everything about a method from its class (issue 11, "one home per concept"):
a throwaway prefill method with presets, registered inside the test (and unregistered in a ``finally``),
shows up in the prefill driver's default list and gets its settings (searched and fixed) without an
edit anywhere else; a throwaway decode method likewise in the decode driver's default grid and budget
mapping; the one recorder reuses a pattern only when the method declares it static."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sparsattn.eval import decode_quality as dq
from sparsattn.eval import prefill_quality as pq
from sparsattn.eval.recorder import SelectRecorder
from sparsattn.methods import base, get_method, list_methods
from sparsattn.methods.a_shape import AShape
from sparsattn.methods.base import DensityKnob, FixedSetting, SelectContext, register
from sparsattn.methods.streaming_llm import StreamingLLM

PRE, DEC = "zz_driver_prefill", "zz_driver_decode"


def _define():
    @register(PRE)
    @dataclass
    class DriverPrefill(AShape):
        """DriverPrefill: A-shape under another name, with its own presets (test only)."""
        paper = "throwaway (no arXiv id)"

        @classmethod
        def density_knob(cls, T, target, ctx):
            b = target * (T + 1) / 2
            return DensityKnob(cls.name, "n_local", 1, T, True, True, max(1.0, b - 4),
                               lambda x: dict(n_init=4, n_local=int(x), block_size=ctx.block_size),
                               lambda x: f"zz-local{int(x)}", note="zz rule")

        @classmethod
        def fixed_settings(cls, T, ctx):
            return [FixedSetting("zz whole window", {"n_init": 0, "n_local": T, "block_size": ctx.block_size},
                                 target=1.0)]

    @register(DEC)
    @dataclass
    class DriverDecode(StreamingLLM):
        """DriverDecode: StreamingLLM under another name, with its own budget rule (test only)."""
        paper = "throwaway (no arXiv id)"

        @classmethod
        def budget_config(cls, budget_tokens, ctx):
            return {"n_sink": 2, "window": max(1, int(budget_tokens) - 2)}

    return DriverPrefill, DriverDecode


@pytest.fixture
def throwaway():
    list_methods()  # the real methods first
    try:
        yield _define()
    finally:
        for name in (PRE, DEC):
            base._REGISTRY.pop(name, None)


def _capture(T=512, Hq=2, Hkv=1, D=16, layers=2, seed=0) -> pq.Captured:
    g = torch.Generator().manual_seed(seed)
    lay = {}
    for l in range(layers):
        q, k, v = torch.randn(1, Hq, T, D, generator=g), torch.randn(1, Hkv, T, D, generator=g), \
            torch.randn(1, Hkv, T, D, generator=g)
        lay[l] = (q, k, v, q, k)
    return pq.Captured(lay, {l: D ** -0.5 for l in lay}, T)


def test_a_prefill_method_with_presets_reaches_the_prefill_driver(throwaway, tmp_path):
    assert PRE in pq.default_prefill_methods() and PRE in pq.PREFILL_METHODS
    assert DEC not in pq.default_prefill_methods()
    cap = _capture()
    got = pq.resolve_settings([PRE], [0.1], 512, cap, n_layers=2, n_heads=2, out_dir=tmp_path, calibrations={})
    fixed = [s for s in got if s.label == "zz whole window"]
    searched = [s for s in got if s.label.startswith("zz-local")]
    assert len(fixed) == 1 and len(searched) == 1, [(s.label, s.error) for s in got]
    assert fixed[0].target_name == "1.0" and fixed[0].density_cal == pytest.approx(1.0)
    s = searched[0]
    assert not s.error and s.note == "zz rule" and s.target_met
    # the recorded density is the pattern's own, re-measured on the same capture
    assert pq.measure_density(get_method(PRE, **s.config), cap)[0] == pytest.approx(s.density_cal)
    assert abs(s.density_cal - 0.1) <= 0.01


def test_a_proxy_knob_is_searched_on_the_proxy_and_measured_once(throwaway, tmp_path):
    Pre, _ = throwaway
    inner = AShape.density_knob(512, 0.1, base.PresetContext())
    # a family searched on A-shape's density, mapped to a configuration of the throwaway with a wider window
    Pre.density_knob = classmethod(lambda cls, T, target, ctx: DensityKnob(
        cls.name, "n_local", inner.lo, inner.hi, True, True, inner.guess,
        lambda x: dict(n_init=4, n_local=2 * int(x), block_size=64), lambda x: f"zz-double{int(x)}", proxy=inner))
    Pre.fixed_settings = classmethod(lambda cls, T, ctx: [])
    (s,) = pq.resolve_settings([PRE], [0.1], 512, _capture(), n_layers=2, n_heads=2, out_dir=tmp_path,
                               calibrations={})
    assert not s.error and s.evals == 1
    x = int(s.label[len("zz-double"):])
    a = pq.measure_density(get_method("a_shape", **inner.config(x)), _capture())[0]
    assert abs(a - 0.1) <= 0.01           # the knob hit the target on the proxy
    assert s.density_cal > 1.5 * a and s.target_met is False   # the method's own density, measured once


def test_a_decode_method_with_a_budget_preset_reaches_the_decode_driver(throwaway):
    assert DEC in dq.default_decode_methods() and DEC in dq.BUDGET_MAPPED
    assert PRE not in dq.default_decode_methods()
    assert dq.budget_config(DEC, 64, n_layers=4, group_size=2) == {"n_sink": 2, "window": 62}
    assert dq.calibrating_methods([DEC]) == []


def test_the_registry_is_clean_afterwards():
    assert PRE not in list_methods() and DEC not in list_methods()


class _Counting(AShape):
    """A-shape counting its select calls (static pattern: key ``()``)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.n = 0

    def select(self, q, k, ctx=None):
        self.n += 1
        return super().select(q, k, ctx)


def test_the_recorder_reuses_only_static_patterns():
    m = _Counting(n_init=4, n_local=32, block_size=32)
    q, k = torch.randn(1, 2, 96, 16), torch.randn(1, 1, 96, 16)
    with SelectRecorder(m, densities=True, reuse_static=True) as rec:
        p0 = m.select(q, k, SelectContext(layer=0, phase="prefill"))
        p1 = m.select(q, k, SelectContext(layer=5, phase="prefill"))
        m.select(q[:, :, :64], k[:, :, :64], SelectContext(layer=0, phase="prefill"))  # other lengths: built
    assert p1 is p0 and m.n == 2 and rec.reused == 1
    assert len(rec.densities) == 3 and rec.calls == {"prefill": 3}
    assert rec.densities[0] == pytest.approx(float(p0.density))
    m.static_pattern_key = lambda layer: None  # a data-dependent pattern: never reused
    m.n = 0
    with SelectRecorder(m, reuse_static=True) as rec:
        m.select(q, k, SelectContext(layer=0))
        m.select(q, k, SelectContext(layer=0))
    assert m.n == 2 and rec.reused == 0 and rec.densities == [] and rec.calls == {"none": 2}
    assert "select" not in m.__dict__  # the hook is removed on exit


# ----------------------------------------------------------------------------------------------
# the rules that moved from the driver onto the methods keep their meaning
# ----------------------------------------------------------------------------------------------

def test_masformer_preset_searches_the_overall_density_or_falls_back_to_a_shape(tmp_path):
    cap = _capture(T=512, layers=8)
    got = {s.target: s for s in pq.resolve_settings(["masformer", "a_shape"], [0.05, 0.3], 512, cap, n_layers=8,
                                                    n_heads=2, out_dir=tmp_path, calibrations={})
           if s.method == "masformer"}
    roomy, tight = got[0.3], got[0.05]
    assert not roomy.error and roomy.target_met and roomy.note.startswith("inner a_shape searched")
    assert roomy.config["full_layers"] == [0] and roomy.label.startswith("L0 dense + ")
    # 1/8 of the density is the dense layer 0: below it, A-shape's own setting for 0.05 and target not met
    assert not tight.error and tight.target_met is False and tight.evals == 1 and "one dense layer" in tight.note
    a5 = next(s for s in pq.resolve_settings(["a_shape"], [0.05], 512, cap, n_layers=8, n_heads=2, out_dir=tmp_path,
                                             calibrations={}))
    assert tight.config["inner_config"] == a5.config
    assert tight.density_cal == pytest.approx((1.0 + 7 * a5.density_cal) / 8, rel=0.05)


def test_razor_preset_keeps_the_top_heads_in_the_work_dir(tmp_path):
    from sparsattn.calibrate import shipped_dir
    from sparsattn.methods.razor import RazorAttention

    src = str(shipped_dir() / "razor.json")
    ctx = base.PresetContext(n_layers=8, n_heads=8, calibrations={"razor": src}, work_dir=str(tmp_path))
    fam = RazorAttention.density_knob(4096, 0.1, ctx)  # razor.dense_head_count: 5 heads (issue 21)
    path = fam.config(100)["path"]
    assert path.startswith(str(tmp_path)) and fam.label(100).startswith("5 ret. heads")
    assert sum(len(h) for h in get_method("razor", **fam.config(100)).retrieval_heads.values()) == 5
    no_dir = RazorAttention.density_knob(4096, 0.1, base.PresetContext(calibrations={"razor": src}))
    assert no_dir.config(100)["path"] == src  # without a work_dir the calibration is used as it is


def test_refits_at_each_density_are_recorded_even_when_one_fails(throwaway, tmp_path, monkeypatch):
    from sparsattn.eval import prefill_settings

    seen = []

    def fit(model, tok, density, out, *, lengths):
        seen.append((density, tuple(lengths)))
        if density > 0.2:
            raise RuntimeError("infeasible")
        return f"fake fit {density:g}"

    monkeypatch.setattr(prefill_settings, "density_fitters", lambda methods: {PRE: fit} if PRE in methods else {})
    model = torch.nn.Linear(2, 2)
    fitted = pq.fit_at_densities(model, None, [PRE, "a_shape"], [0.1, 0.3], tmp_path, lengths=(256,))
    assert seen == [(0.1, (256,)), (0.3, (256,))] and set(fitted) == {PRE}
    path, note = fitted[PRE][0.1]
    assert path == tmp_path / "calibration" / f"{PRE}_b0.1.json" and note.startswith("fake fit 0.1")
    assert fitted[PRE][0.3][0] is None and "infeasible" in fitted[PRE][0.3][1]
    assert not any(p.requires_grad for p in model.parameters())
    got = pq.resolve_settings([PRE], [], 512, _capture(), n_layers=2, n_heads=2, out_dir=tmp_path, calibrations={},
                              fitted={PRE: {0.3: fitted[PRE][0.3]}})
    bad = next(s for s in got if s.label == "fit b0.3")
    assert "infeasible" in bad.error and bad.target == 0.3
