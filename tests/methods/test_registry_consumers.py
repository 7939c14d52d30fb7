"""A method registered with presets in a temporary module (registry monkeypatched) appears, without
editing another file, in ``sparsattn list``, the conformance tests' method lists, the prefill quality
driver's density search and the decode quality driver's budget mapping (issue 11). The benchmarks and
the methods table script have the equivalent check in ``tests/test_one_file_method.py``."""
from __future__ import annotations

import sys
import types

import pytest

from sparsattn.methods import base

SOURCE = '''
from dataclasses import dataclass
from sparsattn.methods.base import DensityKnob, Method, register
from sparsattn.methods.a_shape import AShape
from sparsattn.methods.streaming_llm import StreamingLLM


@register("zz_throwaway_prefill")
@dataclass
class ThrowawayPrefill(AShape):
    """ThrowawayPrefill: A-shape under another name (test only)."""
    paper = "throwaway (no arXiv id)"

    @classmethod
    def density_knob(cls, T, target, ctx):
        return DensityKnob(cls.name, "n_local", 1, T, True, True, 7.0,
                           lambda x: dict(n_init=4, n_local=int(x), block_size=ctx.block_size),
                           lambda x: f"throwaway{int(x)}")


@register("zz_throwaway_decode")
@dataclass
class ThrowawayDecode(StreamingLLM):
    """ThrowawayDecode: StreamingLLM under another name (test only)."""
    paper = "throwaway (no arXiv id)"

    @classmethod
    def budget_config(cls, budget_tokens, ctx):
        return {"n_sink": 1, "window": max(1, int(budget_tokens) - 1 - ctx.group_size)}
'''


@pytest.fixture
def throwaway(monkeypatch):
    from sparsattn.methods import list_methods

    list_methods()  # load the real methods first, then extend a copy of the registry
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    mod = types.ModuleType("sparsattn_throwaway_methods")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    exec(compile(SOURCE, "<throwaway>", "exec"), mod.__dict__)
    return mod


def test_a_registered_method_with_presets_reaches_every_consumer(throwaway, capsys):
    from sparsattn import cli
    from sparsattn.eval import decode_quality as dq
    from sparsattn.eval import prefill_quality as pq
    from sparsattn.methods import get_method, list_methods

    assert "zz_throwaway_prefill" in list_methods("prefill")  # the conformance tests' METHODS
    assert "zz_throwaway_decode" in list_methods("decode")
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "zz_throwaway_prefill" in out and "zz_throwaway_decode" in out
    fam = pq.knob_family("zz_throwaway_prefill", 256, 0.3)
    assert fam.guess == 7.0 and fam.label(9) == "throwaway9"
    assert get_method("zz_throwaway_prefill", **fam.config(9)).n_local == 9
    assert "zz_throwaway_decode" in dq.budget_mapped()
    assert dq.budget_config("zz_throwaway_decode", 64, n_layers=8, group_size=4) == {"n_sink": 1, "window": 59}
    assert "zz_throwaway_decode" not in dq.slow_methods()


def test_the_registry_is_restored_after_the_throwaway():
    from sparsattn.methods import list_methods

    assert "zz_throwaway_prefill" not in list_methods()
