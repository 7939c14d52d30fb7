"""MoA plan files with several budgets, per-head normalised profiles and density bounds beyond the
profiled lengths (issue 21)."""
import json

import pytest
import torch

from sparsattn.calibration import ModelShape
from sparsattn.methods.base import PresetContext, SelectContext
from sparsattn.methods.moa import MoA, span_density

SHAPE = ModelShape(2, 4, 2, 16)


def _plan(budget, alpha0=10.0):
    alpha = [[alpha0, 70.0, -50.0, 200.0] for _ in range(2)]
    beta = [[0.0, 0.1, 0.5, 0.0] for _ in range(2)]
    return MoA().set_plan(SHAPE, alpha, beta, sink=16, min_span=8, info={"budget": budget})


def test_several_budgets_round_trip_and_selection(tmp_path):
    m = _plan(0.5).add_plan(_plan(0.12, alpha0=-100.0))
    assert m.budgets == [0.5, 0.12] and m.plan["info"]["budget"] == 0.5
    path = m.save(tmp_path / "two.json")
    raw = json.loads(open(path).read())["data"]
    assert raw["info"]["budget"] == 0.5 and [p["info"]["budget"] for p in raw["plans"]] == [0.12]
    d = MoA(path=path)
    assert d.budgets == [0.5, 0.12] and d.plan["info"]["budget"] == 0.5
    s = MoA(path=path, budget=0.12)
    assert s.plan["alpha"][0, 0] == -100.0 and s.spans(0, 300).tolist() == [8, 100, 100, 200]
    q, k = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16)
    assert s.select(q, k, SelectContext(layer=0)).density < d.select(q, k, SelectContext(layer=0)).density
    with pytest.raises(ValueError, match=r"budget: .*\[0.5, 0.12\]"):
        MoA(path=path, budget=0.3)
    with pytest.raises(ValueError, match="budget"):
        MoA(budget=1.5)
    # a plan of the same budget replaces the held one; default=True puts it first
    m.add_plan(_plan(0.12, alpha0=5.0), default=True)
    assert m.budgets == [0.12, 0.5] and m.plan["info"]["budget"] == 0.5
    with pytest.raises(ValueError, match="other"):
        m.add_plan(MoA().set_plan(ModelShape(1, 4, 2, 16), [[0.0] * 4], [[1.0] * 4], info={"budget": 0.2}))


def test_one_plan_files_are_unchanged_and_extra_plans_need_a_budget(tmp_path):
    path = _plan(0.5).save(tmp_path / "one.json")
    assert "plans" not in json.loads(open(path).read())["data"]
    assert MoA(path=path).budgets == [0.5]
    doc = json.loads(open(path).read())
    extra = dict(doc["data"])
    extra["info"] = {}
    doc["data"]["plans"] = [extra]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"bad.json.*plans\[0\]\.info.*budget"):
        MoA(path=str(tmp_path / "bad.json"))


def test_fixed_settings_list_every_plan(tmp_path):
    path = _plan(0.5).add_plan(_plan(0.12)).save(tmp_path / "moa.json")

    got = MoA.fixed_settings(4096, PresetContext(calibrations={"moa": path}))
    assert [s.label for s in got] == ["shipped plan (b0.5)", "shipped plan (b0.12)"]
    assert got[0].config == {"path": path} and got[1].config == {"path": path, "budget": 0.12}


def _profiles(lengths, L=2, H=4, scale_long=1e-4):
    """Head (1, 3) puts a tiny effect at the far end of the context (a needle read from far away);
    every other head an effect decaying as 1 / (distance + 1) up to distance 256 (local heads)."""
    out = {}
    for n in lengths:
        d = torch.arange(n, dtype=torch.float64)
        p = torch.where(d < 256, 1.0 / (d + 1), 0.0).expand(L, H, n).clone()
        p[1, 3] = 0
        p[1, 3, n - 40:] = scale_long
        out[n] = p
    return out


def test_head_normalisation_gives_the_span_to_a_weak_far_reader():
    lengths = (2048, 4096)
    kw = dict(budget=0.3, sink=16, min_span=16, alpha_step=64)
    raw = MoA.fit({"shape": SHAPE, "profiles": _profiles(lengths)}, **kw)
    norm = MoA.fit({"shape": SHAPE, "profiles": _profiles(lengths)}, normalize="head", **kw)
    for n in lengths:
        assert raw.spans(1, n)[3] < n // 2  # raw effects: the far reader is the cheapest head to cut
        assert norm.spans(1, n)[3] == n  # normalised: it keeps its whole context
    assert norm.plan["info"]["normalize"] == "head" and max(norm.plan["info"]["density"]) <= 0.3 + 1e-9
    with pytest.raises(ValueError, match="normalize"):
        MoA.fit({"shape": SHAPE, "profiles": _profiles(lengths)}, normalize="rows", **kw)


def test_extend_lengths_bound_the_density_where_the_plan_is_used():
    lengths, ext = (512, 1024), (4096,)
    prof = {}
    for n in lengths:  # every head uses its whole context, but for two local heads in layer 0
        p = torch.ones(2, 4, n, dtype=torch.float64)
        p[0, :2] = 0
        p[0, :2, :24] = 1.0
        prof[n] = p
    kw = dict(budget=0.3, sink=16, min_span=16, alpha_step=128)
    free = MoA.fit({"shape": SHAPE, "profiles": prof}, **kw)
    bound = MoA.fit({"shape": SHAPE, "profiles": prof}, extend_lengths=ext, **kw)

    def density(m, n):
        return float(torch.stack([span_density(m.spans(l, n), 16, n) for l in range(2)]).mean())

    assert density(free, 4096) > 0.3 + 1e-3  # the elastic rule grows past the budget unprofiled
    assert density(bound, 4096) <= 0.3 + 1e-9
    assert bound.plan["info"]["extend_lengths"] == [4096] and len(bound.plan["info"]["density"]) == 3
    assert all(d <= 0.3 + 1e-9 for d in bound.plan["info"]["density"])


def test_signed_profiles_use_the_size_of_the_predicted_change():
    lengths = (2048, 4096)
    kw = dict(budget=0.35, sink=16, min_span=16, alpha_step=256)
    pos = MoA.fit({"shape": SHAPE, "profiles": _profiles(lengths)}, **kw)
    neg = MoA.fit({"shape": SHAPE, "profiles": {n: -p for n, p in _profiles(lengths).items()}}, **kw)
    assert torch.equal(pos.plan["alpha"], neg.plan["alpha"]) and torch.equal(pos.plan["beta"], neg.plan["beta"])
    assert pos.plan["info"]["loss"] == pytest.approx(neg.plan["info"]["loss"])


def test_relative_extension_keeps_a_far_reader_whole_beyond_the_profiled_lengths():
    lengths = (1024, 2048)
    kw = dict(budget=0.3, sink=16, min_span=16, alpha_step=256, extend_lengths=(8192,))
    prof = {n: p * torch.tensor([1.0, 1, 1, 1e4], dtype=torch.float64)[None, :, None] for n, p in _profiles(lengths).items()}
    none = MoA.fit({"shape": SHAPE, "profiles": prof}, **kw)
    rel = MoA.fit({"shape": SHAPE, "profiles": prof}, extend_loss="relative", **kw)
    for m in (none, rel):  # both keep the far reader whole where it was profiled
        assert [int(m.spans(1, n)[3]) for n in lengths] == list(lengths)
    assert none.spans(1, 8192)[3] < 8192  # a constant span serves the profiled lengths as well, and is cheaper
    assert rel.spans(1, 8192)[3] == 8192 and rel.plan["info"]["extend_loss"] == "relative"
    bounded = MoA.fit({"shape": SHAPE, "profiles": prof}, bounds={1024: 0.5}, **dict(kw, budget=0.2))
    assert bounded.plan["info"]["bounds"] == {"1024": 0.5, "2048": 0.2, "8192": 0.2}
    assert bounded.plan["info"]["density"][0] > 0.2 + 1e-3 and max(bounded.plan["info"]["density"][1:]) <= 0.2 + 1e-9
    with pytest.raises(ValueError, match="bounds"):
        MoA.fit({"shape": SHAPE, "profiles": prof}, bounds={4096: 0.5}, **kw)
    with pytest.raises(ValueError, match="extend_loss"):
        MoA.fit({"shape": SHAPE, "profiles": prof}, extend_loss="absolute", **kw)


def test_full_heads_keep_every_key_at_every_length():
    lengths = (1024, 2048)
    kw = dict(budget=0.45, sink=16, min_span=16, alpha_step=256, extend_lengths=(4096,))
    prof = _profiles(lengths)
    for n in lengths:  # head (0, 1) predicts no loss beyond a short span: the plain search cuts it
        prof[n][0, 1] = 0
        prof[n][0, 1, :8] = 1.0
    free = MoA.fit({"shape": SHAPE, "profiles": prof}, **kw)
    assert free.spans(0, 4096)[1] < 4096
    kept = MoA.fit({"shape": SHAPE, "profiles": prof}, full_heads=[1], **kw)
    assert [int(kept.spans(0, n)[1]) for n in lengths + (4096,)] == [1024, 2048, 4096]
    assert kept.plan["info"]["full_heads"] == [[0, 1]]
    assert all(d <= 0.45 + 1e-9 for d in kept.plan["info"]["density"])
    with pytest.raises(ValueError, match="full_heads"):
        MoA.fit({"shape": SHAPE, "profiles": prof}, full_heads=[8], **kw)
