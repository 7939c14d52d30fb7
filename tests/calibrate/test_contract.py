"""The one calibration contract (methods.base.Calibrated) on all five calibrated methods: fit ->
save -> load (class and instance) round trips, one ``path`` field, the deprecated aliases, and the
checked loader's errors; MoA.fit against a direct search_plan call."""
import json
import warnings
from pathlib import Path

import pytest
import torch

from sparsattn.calibrate import calibrated_methods, calibrator
from sparsattn.calibration import ModelShape
from sparsattn.methods import get_method
from sparsattn.methods.base import Calibrated
from sparsattn.methods.double_sparsity import DoubleSparsity
from sparsattn.methods.minference import MInference
from sparsattn.methods.moa import MoA, candidate_grid, search_plan, span_density, spans_for
from sparsattn.methods.razor import RazorAttention
from sparsattn.methods.seer_attention import SeerAttention, SeerGate

CALIBRATED = ["double_sparsity", "minference", "moa", "razor", "seer_attention"]


def _qkv(L=2, Hq=4, Hkv=2, T=128, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {l: (torch.randn(1, Hq, T, D, generator=g), torch.randn(1, Hkv, T, D, generator=g),
                torch.randn(1, Hkv, T, D, generator=g)) for l in range(L)}


def _profiles(L=2, H=4, lengths=(256, 512), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(L, H, n, generator=g, dtype=torch.float64) * torch.linspace(1, 0.01, n, dtype=torch.float64)
            for n in lengths}


def _fit(name, path):
    """A fitted instance of ``name`` saved to ``path`` and its state as a comparable value."""
    if name == "minference":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = MInference.fit(_qkv(), [{"type": "a_shape", "n_init": 16, "n_local": 64},
                                        {"type": "block_sparse", "top_k": 2}], block_size=32, last_q=32, path=path)
        return m, lambda x: x.plan
    if name == "razor":
        return RazorAttention.fit({l: t[:2] for l, t in _qkv(T=96).items()}, 32, path=path), lambda x: x.retrieval_heads
    if name == "moa":
        m = MoA.fit({"shape": ModelShape(2, 4, 2, 16), "profiles": _profiles()}, budget=0.5, alpha_step=64, path=path)
        return m, lambda x: (x.plan["alpha"].tolist(), x.plan["beta"].tolist(), x.plan["info"])
    if name == "double_sparsity":
        return DoubleSparsity.fit(_qkv(), path=path, group_factor=4), lambda x: x.channels
    gate = SeerGate(4, 2, 16, 2, hidden_size=16, seed=0)
    return SeerAttention.fit(gate, path=path), lambda x: {k: v.clone() for k, v in x.gate.state_dict().items()}


def _same(a, b):
    if isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a == b


def test_registry_lists_the_calibrated_methods_and_a_module_each():
    assert calibrated_methods() == CALIBRATED
    for name in CALIBRATED:
        mod = calibrator(name)
        assert callable(mod.run) and callable(mod.add_arguments) and mod.OUT and isinstance(mod.DEFAULTS, dict)
    with pytest.raises(ValueError, match="calibrated method"):
        calibrator("a_shape")


@pytest.mark.parametrize("name", CALIBRATED)
def test_fit_save_load_round_trip(name, tmp_path):
    out = str(tmp_path / ("cal" if name == "seer_attention" else "cal.json"))
    m, state = _fit(name, out)
    cls = type(m)
    assert issubclass(cls, Calibrated) and m.is_fitted and m.path == out
    by_field = get_method(name, path=Path(out))  # one path field, a PathLike accepted
    by_class = cls.load(Path(out))
    by_inst = get_method(name).load(out)  # on an instance: fills it in, returns it
    for x in (by_field, by_class, by_inst):
        assert x.is_fitted and x.path == out and _same(state(x), state(m))
    again = m.save(tmp_path / "again")  # save returns the path written
    assert Path(again).exists() and _same(state(cls.load(again)), state(m))
    assert not get_method(name).is_fitted


@pytest.mark.parametrize("name", ["minference", "moa", "razor", "double_sparsity"])
def test_bad_files_raise_value_error_naming_the_file(name, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        get_method(name, path=str(bad))
    with pytest.raises(ValueError, match="missing.json"):
        get_method(name).load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="path"):
        get_method(name, path=3)


def test_instance_load_refuses_config_and_expect_shape_is_checked(tmp_path):
    m, _ = _fit("moa", str(tmp_path / "moa.json"))
    with pytest.raises(ValueError, match="config"):
        MoA().load(m.path, block_size=32)
    with pytest.raises(ValueError, match="num_heads"):
        MoA.load(m.path, expect_shape=ModelShape(2, 8, 2, 16))
    d, _ = _fit("double_sparsity", str(tmp_path / "ds.json"))
    DoubleSparsity.load(d.path, expect_shape=ModelShape(2, 4, 2, 16))
    with pytest.raises(ValueError, match="ds.json.*expect_shape"):
        DoubleSparsity.load(d.path, expect_shape=ModelShape(3, 4, 2, 16))
    with pytest.raises(ValueError, match="channels/path"):
        DoubleSparsity(channels=d.channels, path=d.path)


def test_deprecated_aliases_still_work(tmp_path):
    m, _ = _fit("moa", str(tmp_path / "moa.json"))
    a = get_method("moa", plan_path=m.path)
    assert a.path == a.plan_path == m.path and a.is_fitted
    assert MoA().load_plan(m.path).path == m.path
    assert Path(m.save_plan(tmp_path / "p2.json")).exists()
    with pytest.raises(ValueError, match="plan_path/path"):
        MoA(plan_path=m.path, path=str(tmp_path / "p2.json"))
    s, _ = _fit("seer_attention", str(tmp_path / "gate"))
    g = get_method("seer_attention", gate_path=s.path)
    assert g.path == g.gate_path == s.path and g.is_fitted
    assert SeerAttention().load_gate(s.path).path == s.path
    d = DoubleSparsity(group_factor=4)
    chans = d.calibrate([t[0] for t in _qkv().values()], [t[1] for t in _qkv().values()])
    assert chans == DoubleSparsity.fit(_qkv(), group_factor=4).channels


def test_moa_fit_equals_a_direct_search():
    prof = _profiles()
    m = MoA.fit({"shape": ModelShape(2, 4, 2, 16), "profiles": prof}, budget=0.4, alpha_step=64, sink=8, min_span=8)
    alphas, betas = candidate_grid([256, 512], 64, 9)
    losses, dens = [], []
    for n in (256, 512):
        suffix = torch.cat([prof[n].flip(-1).cumsum(-1).flip(-1), torch.zeros(2, 4, 1, dtype=torch.float64)], -1)
        sp = spans_for(alphas, betas, n, 8)
        losses.append(suffix[..., sp].reshape(8, -1))
        dens.append(span_density(sp, 8, n)[None].expand(8, -1))
    choice, info = search_plan(torch.stack(losses), torch.stack(dens), 0.4)
    assert torch.equal(m.plan["alpha"], alphas[choice].view(2, 4).double())
    assert m.plan["info"]["budget"] == 0.4 and m.plan["info"]["lengths"] == [256, 512]
    with pytest.raises(ValueError, match=r"profiles'\]\[256\]"):
        MoA.fit({"shape": ModelShape(2, 4, 2, 16), "profiles": {256: torch.zeros(2, 4, 100)}}, budget=0.5)


def test_shipped_files_load_through_the_contract():
    from sparsattn.calibrate import shipped_dir

    d = shipped_dir()
    for name, f in (("minference", "minference.json"), ("razor", "razor.json"), ("moa", "moa.json"),
                    ("seer_attention", "seer_gate")):
        if not (d / f).exists():
            pytest.skip(f"shipped {f} missing")
        assert get_method(name).load(d / f).is_fitted
    prov = json.loads((d / "provenance.json").read_text())
    assert {"minference", "razor", "moa"} <= set(prov)
