"""Model-level calibration modules on a tiny random Llama (no tokenizer, no files): the captured
q/k reach the method's fit, the file loads back, and the command line lists every method."""
import argparse
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsattn.calibrate import calibrate  # noqa: E402
from sparsattn.calibrate.cli import build_parser  # noqa: E402
from sparsattn.calibrate.double_sparsity import fit_double_sparsity  # noqa: E402
from sparsattn.calibrate.razor import fit_razor  # noqa: E402
from sparsattn.capture import capture_qkv  # noqa: E402
from sparsattn.methods.double_sparsity import DoubleSparsity  # noqa: E402
from sparsattn.methods.razor import RazorAttention  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_double_sparsity_from_a_model_equals_fit_on_its_capture(tiny, tmp_path):
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(1))
    m = fit_double_sparsity(tiny, None, ids=ids, out=str(tmp_path / "ds.json"), group_factor=4)
    ref = DoubleSparsity.fit(capture_qkv(tiny, ids), group_factor=4)
    assert m.channels == ref.channels and len(m.channels) == 2 and len(m.channels[0]) == 2
    assert DoubleSparsity.load(tmp_path / "ds.json").channels == m.channels


def test_razor_from_a_model(tiny, tmp_path):
    tok = types.SimpleNamespace(vocab_size=128)
    r = fit_razor(tiny, tok, period=24, repeats=3, seed=0, low=4, out=str(tmp_path / "r.json"), echo_fraction=0.25)
    loaded = RazorAttention.load(tmp_path / "r.json")
    assert loaded.retrieval_heads == r.retrieval_heads and sorted(r.retrieval_heads) == [0, 1]
    assert sum(len(h) for h in r.retrieval_heads.values()) >= 2  # 25% of 8 heads by echo, >= 1 by induction


def test_command_line_lists_every_calibrated_method_and_checks_options():
    p = build_parser(argparse.ArgumentParser(prog="sparsattn calibrate"))
    a = p.parse_args(["razor", "--out", "x.json", "--period", "64"])
    assert a.method == "razor" and a.period == 64 and a.model is None
    with pytest.raises(SystemExit):
        p.parse_args(["a_shape"])
    with pytest.raises(ValueError, match="unknown option"):
        calibrate("razor", out="x.json", nonsense=1)
