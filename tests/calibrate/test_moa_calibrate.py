"""sparsattn calibrate moa (issue 21): per-sample shares of the profile, adding a plan of another
budget to an existing plan file with its provenance."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsattn.calibration import ModelShape  # noqa: E402
from sparsattn.calibrate import moa as cal  # noqa: E402
from sparsattn.methods.moa import MoA  # noqa: E402


def _tiny():
    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_per_sample_share_weighs_every_sample_alike():
    model = _tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(2):
        ids = torch.randint(3, 259, (1, 64), generator=g)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, -8:] = True
        samples.append((ids, mask))
    one = [cal.profile_moa(model, [s], sink=4) for s in samples]
    mean = cal.profile_moa(model, samples, sink=4)
    share = cal.profile_moa(model, samples, sink=4, per_sample="share")
    assert torch.allclose(mean, (one[0] + one[1]) / 2)
    assert torch.allclose(share, (one[0] / one[0].sum() + one[1] / one[1].sum()) / 2)
    assert float(share.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="per_sample"):
        cal.profile_moa(model, samples, per_sample="max")


def _plan(budget, alpha0):
    return MoA().set_plan(ModelShape(2, 4, 2, 16), [[alpha0] * 4] * 2, [[0.0] * 4] * 2, sink=16, min_span=8,
                          info={"budget": budget, "density": [budget]})


def test_add_keeps_the_default_plan_and_every_plans_command(tmp_path, monkeypatch):
    out = tmp_path / "moa.json"
    _plan(0.5, 100.0).save(out)  # a plan written before plans recorded their command
    (tmp_path / "provenance.json").write_text(json.dumps({"moa": {"call": "fit_moa(budget=0.5)"}}))
    import sparsattn.calibrate._common as common

    monkeypatch.setattr(common, "load_model", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(cal, "fit_moa", lambda *a, budget, **k: _plan(budget, 20.0))
    m, rec = cal.run(None, str(out), budget=0.12, normalize="head", extend_lengths=(4096,), add=True)
    got = MoA(path=str(out))
    assert got.budgets == [0.5, 0.12] and got.plan["alpha"][0, 0] == 100.0
    assert MoA(path=str(out), budget=0.12).plan["alpha"][0, 0] == 20.0
    assert "--budget 0.12" in rec["call"] and "--normalize head" in rec["call"] and rec["call"].endswith("--add")
    assert rec["plans"] == [{"budget": 0.5, "call": "fit_moa(budget=0.5)"}, {"budget": 0.12, "call": rec["call"]}]
    # adding the same budget again replaces that plan, the default stays first
    monkeypatch.setattr(cal, "fit_moa", lambda *a, budget, **k: _plan(budget, 30.0))
    cal.run(None, str(out), budget=0.12, add=True)
    assert MoA(path=str(out)).budgets == [0.5, 0.12] and MoA(path=str(out), budget=0.12).plan["alpha"][0, 0] == 30.0
    with pytest.raises(ValueError, match="--add"):
        cal.run(None, str(tmp_path / "none.json"), add=True)
    with pytest.raises(ValueError, match="normalize"):
        cal.run(None, str(out), normalize="rows")


def test_command_line_options_of_the_shipped_sparse_plan():
    import argparse

    from sparsattn.calibrate.cli import build_parser

    assert set(cal.RETRIEVAL_PLAN) <= set(cal.DEFAULTS)
    a = build_parser(argparse.ArgumentParser()).parse_args(
        ["moa", "--bounds", "1024:0.3,2048:0.2,4096:0.125", "--signed", "--extend-lengths", "4096,8192",
         "--extend-loss", "relative", "--keep-readers", "0.5", "--add"])
    assert a.bounds == ((1024, 0.3), (2048, 0.2), (4096, 0.125)) == cal.RETRIEVAL_PLAN["bounds"] and a.signed and a.add
    assert a.keep_readers == 0.5 == cal.RETRIEVAL_PLAN["keep_readers"]
    assert a.extend_lengths == (4096, 8192) and a.extend_loss == "relative"
    for bad in ("1024", "1024:1.5", "x:0.2"):
        with pytest.raises(ValueError, match="bounds"):
            cal._bounds(bad)


def test_reading_heads_from_the_profiled_samples():
    """profile_moa with needle positions: each head's largest share of the answer rows' attention on the
    needle, equal to the share computed from the dense probabilities directly; the profile unchanged."""
    model = _tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 259, (1, 64), generator=g)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, -4:] = True
    needle = [10, 11, 12]
    reading: dict = {}
    prof = cal.profile_moa(model, [(ids, mask, needle)], sink=4, reading=reading)
    assert torch.allclose(prof, cal.profile_moa(model, [(ids, mask)], sink=4))
    assert sorted(reading) == [0, 1] and all(r.shape == (4,) for r in reading.values())
    out = model(input_ids=ids, output_attentions=True, use_cache=False)
    for l, att in enumerate(out.attentions):  # eager attention probabilities [1, H, T, T]
        direct = att[0][:, 59:63][..., needle].sum(-1).mean(-1).double()
        torch.testing.assert_close(reading[l], direct, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="keep_readers"):
        cal.fit_moa(model, None, data="copy", keep_readers=0.5, lengths=(512,))
