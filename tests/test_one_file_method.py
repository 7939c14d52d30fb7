"""A method is one file (issue 11): a prefill and a decode method registered with presets inside this
test (and a KV policy), with no other edit, reach ``sparsattn list``, the methods benchmark, the
decode benchmark, the KV memory benchmark and the methods table script; the registries are restored
afterwards. The evaluation drivers have the equivalent check in ``tests/methods/test_registry_consumers.py``."""
from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sparsattn.kv import policies
from sparsattn.methods import base

ROOT = Path(__file__).resolve().parents[1]

SOURCE = '''
from dataclasses import dataclass
from sparsattn.methods.base import DensityKnob, Method, register
from sparsattn.methods.a_shape import AShape
from sparsattn.methods.streaming_llm import StreamingLLM


@register("zz_one_file_prefill")
@dataclass
class OneFilePrefill(AShape):
    """OneFilePrefill: A-shape under another name (test only)."""
    paper = "one-file prefill (test, no arXiv id)"
    extra_knob: int = 3

    @classmethod
    def density_knob(cls, T, target, ctx):
        return DensityKnob(cls.name, "n_local", 1, T, True, True, max(1.0, target * T / 2),
                           lambda x: dict(n_init=4, n_local=int(x), block_size=ctx.block_size),
                           lambda x: f"onefile{int(x)}")


@register("zz_one_file_decode")
@dataclass
class OneFileDecode(StreamingLLM):
    """OneFileDecode: StreamingLLM under another name (test only)."""
    paper = "one-file decode (test, no arXiv id)"

    @classmethod
    def budget_config(cls, budget_tokens, ctx):
        return {"n_sink": 1, "window": max(1, int(budget_tokens) - 1)}
'''


def _methods_table():
    spec = importlib.util.spec_from_file_location("methods_table_under_test", ROOT / "scripts" / "methods_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_file(monkeypatch):
    from sparsattn.methods import list_methods

    list_methods()  # the real methods first, then extend copies of the registries
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(policies, "_POLICIES", dict(policies._POLICIES))
    mod = types.ModuleType("sparsattn_one_file_methods")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    exec(compile(SOURCE, "<one_file>", "exec"), mod.__dict__)

    @policies.register_policy("zz_one_file_policy")
    @dataclass
    class OneFilePolicy(policies.StreamingLLMPolicy):
        """OneFilePolicy: sinks + a window of T / 4 (test only)."""

        @classmethod
        def example(cls, T, kv_heads):
            return cls(n_sink=2, window=max(1, T // 4)), f"n_sink=2, window={max(1, T // 4)}"

    return mod


def test_cli_list_shows_both(one_file, capsys):
    from sparsattn import cli

    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "zz_one_file_prefill" in out and "zz_one_file_decode" in out


def test_methods_benchmark_configures_and_times_it(one_file, tmp_path):
    from sparsattn.bench.methods import method_configs, run_methods_bench

    cfg = method_configs(4096, 0.05)["zz_one_file_prefill"]
    assert cfg == {"n_init": 4, "n_local": int(0.05 * 4096 / 2), "block_size": 64}
    rows = run_methods_bench(tiny=True, out_dir=tmp_path, methods=["zz_one_file_prefill"], rep_ms=1.0)
    assert [r["method"] for r in rows] == ["zz_one_file_prefill"]
    assert "error" not in rows[0] and 0 < rows[0]["density"] < 1, rows


def test_decode_benchmark_configures_and_times_it(one_file):
    from sparsattn.bench.decode import decode_method_configs, run_decode_bench

    cfgs = decode_method_configs(64, q_heads=4, kv_heads=2, head_dim=16)
    assert cfgs["zz_one_file_decode"] == {"n_sink": 1, "window": 63}
    rows = run_decode_bench(lengths=(80,), batches=(1,), budgets=(1 / 8,), hq=4, hkv=2, d=16, dtype=torch.float32,
                            device="cpu", flex=False, reps=1, page_sizes=(1,), methods=["zz_one_file_decode"])
    got = [r for r in rows if r["impl"] == "zz_one_file_decode+kernel"]
    assert len(got) == 1 and got[0]["ms"] is not None and "failed" not in got[0]["note"], got


def test_kv_memory_benchmark_measures_a_registered_policy(one_file):
    from sparsattn.bench.kv_memory import run_kv_memory

    rows = run_kv_memory((64,), kv_heads=2, q_heads=4, head_dim=8, dtype=torch.float32)
    r = {x["policy"]: x for x in rows}["zz_one_file_policy"]
    assert r["slots_after"] == 2 * (2 + 16) and r["config"] == "n_sink=2, window=16"


def test_methods_table_script_lists_and_sets_it(one_file):
    mt = _methods_table()
    table = mt.registry_table()
    pre = next(line for line in table.splitlines() if "`zz_one_file_prefill`" in line)
    assert "one-file prefill (test, no arXiv id) | prefill | no |" in pre and "extra_knob=3" in pre
    assert any("`zz_one_file_decode`" in line and "| decode |" in line for line in table.splitlines())
    rows = [r for r in mt.settings(False, T=1024, reference=False) if r[0] == "zz_one_file_prefill"]
    assert [r[1] for r in rows] == ["d0.05: onefile25", "d0.1: onefile51"]


def test_registries_are_restored():
    from sparsattn.methods import list_methods

    assert not any(n.startswith("zz_one_file") for n in list_methods())
    assert "zz_one_file_policy" not in policies.list_policies()


def test_docs_methods_table_is_generated_from_the_registry():
    """docs/methods.md's table is what ``scripts/methods_table.py registry --write`` writes (no drift)."""
    mt = _methods_table()
    text = (ROOT / "docs" / "methods.md").read_text()
    a, b = mt._table_span(text)
    assert text[a:b] == mt.registry_table(), "run: python scripts/methods_table.py registry --write"
