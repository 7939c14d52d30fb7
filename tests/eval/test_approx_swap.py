"""eval.approx_quality's swap part reads its settings from the registry (``swap_configs`` presets):
the approximations that compute their own output are found without naming them, a throwaway method
declaring the preset joins, and one tiny swap run patches exactly the last layers."""
from dataclasses import dataclass

import pytest
import torch

from sparsattn.eval.approx_quality import swap_rows, swap_settings
from sparsattn.methods import base as mb
from sparsattn.methods import get_method, list_methods, method_class
from sparsattn.methods.base import declares


def test_swap_settings_come_from_the_registry():
    got = swap_settings()
    want = {n for n in list_methods("prefill") if declares(method_class(n), "swap_configs")}
    assert want and {m for m, _ in got.values()} == want
    for label, (m, cfg) in got.items():
        inst = get_method(m, **cfg)  # every preset builds
        assert inst.computes_output, f"{label}: swap presets are for methods that compute their own output"


def test_a_new_method_with_the_preset_joins_without_another_edit():
    @dataclass
    class _Throwaway(method_class("hyper")):
        @classmethod
        def swap_configs(cls) -> dict:
            return {"throwaway-a": {"min_seq_len": 64}}

    mb.register("_throwaway_swap")(_Throwaway)
    try:
        assert swap_settings()["throwaway-a"] == ("_throwaway_swap", {"min_seq_len": 64})
    finally:
        mb._REGISTRY.pop("_throwaway_swap", None)
    assert "throwaway-a" not in swap_settings()


def test_tiny_swap_run_on_the_bundled_model():
    pytest.importorskip("transformers")
    from sparsattn.models.load import load_model

    torch.manual_seed(0)
    model, tok, _ = load_model(device="cpu")
    label = next(iter(swap_settings()))
    rows = swap_rows(model, tok, 256, n_passkey=1, layer_counts=(1,), configs={label: swap_settings()[label]},
                     ppl_windows=1, repeats=1, backend="reference", log=lambda m: None)
    assert [r["setting"] for r in rows] == ["dense", label]
    assert rows[1]["swap_layers"] == 1 and rows[1]["layers"] == str(model.config.num_hidden_layers - 1)
    assert rows[0]["ppl_change"] == 0.0 and rows[1]["ppl"] > 0 and rows[1]["method"] == swap_settings()[label][0]
