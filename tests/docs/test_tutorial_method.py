"""docs/tutorial_method.md: its code runs as written, and the method it writes reaches the registry's
consumers (issue 16, item 6). The code blocks are executed in order in one module (the registry is a
copy, restored after the test); the checks below are those of the conformance tests
(``tests/methods/test_conformance.py``), which would pick the method up if the file were added to
``sparsattn/methods/``."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from sparsattn.methods import base

TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial_method.md"


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture
def tutorial(monkeypatch):
    pytest.importorskip("transformers")  # the tutorial patches the bundled model (the 'hf' extra)
    from sparsattn.methods import list_methods

    list_methods()  # the real methods first, then a copy of the registry the tutorial extends
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mod = types.ModuleType("sparsattn_tutorial_method")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    blocks = python_blocks(TUTORIAL.read_text())
    assert len(blocks) >= 4, "the tutorial lost its code blocks"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{TUTORIAL.name}[block {i}]", "exec"), mod.__dict__)
    finally:
        torch.set_num_threads(n)
    return mod


def test_tutorial_method_runs_and_conforms(tutorial, capsys):
    import sparsattn
    from sparsattn import cli
    from sparsattn.eval import prefill_quality as pq
    from sparsattn.kernels.block_sparse.reference import dense_reference
    from sparsattn.methods import get_method, list_methods, method_class

    assert "fixed_stride" in list_methods("prefill")
    cls = method_class("fixed_stride")
    assert cls.__doc__.startswith("FixedStride: ") and "arXiv 1904.10509" in cls.paper
    assert 0 < tutorial.p.density < 1 and torch.isfinite(tutorial.out).all()
    assert torch.isfinite(tutorial.logits).all()
    g = torch.Generator().manual_seed(0)
    for B, Hq, Hkv, T, D in [(1, 4, 2, 457, 32), (2, 4, 4, 200, 16)]:
        q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
        p = get_method("fixed_stride", **cls.small_config()).select(q, k)
        p.validate()
        mask = p.to_dense_mask()
        assert not (mask & ~torch.ones(T, T, dtype=torch.bool).tril()).any()
        assert mask.diagonal(dim1=-2, dim2=-1).all() and 0 < p.density < 1
        out = sparsattn.attention(q, k, v, p, backend="reference")
        ref, _ = dense_reference(q, k, v, mask=mask.expand(B, Hq, T, T))
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    q, k, v = (torch.randn(1, h, 333, 32, generator=g) for h in (4, 2, 2))
    p = get_method("fixed_stride", **cls.full_config(333)).select(q, k)
    assert abs(p.density - 1) < 1e-9
    ref, _ = dense_reference(q, k, v, causal=True)
    torch.testing.assert_close(sparsattn.attention(q, k, v, p, backend="reference").double(), ref,
                               atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="stride"):
        get_method("fixed_stride", stride=0)
    fam = pq.knob_family("fixed_stride", 1024, 0.25)
    assert fam.label(3) == "local3+stride9" and get_method("fixed_stride", **fam.config(3)).local_blocks == 3
    assert cli.main(["list"]) == 0 and "fixed_stride" in capsys.readouterr().out


def test_the_registry_is_restored():
    from sparsattn.methods import list_methods

    assert "fixed_stride" not in list_methods()
