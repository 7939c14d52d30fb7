"""eval.approx_quality's fidelity grid comes from the layer registry (the ``fidelity_grid`` hook of each
layer class, no names in the eval module): the grid is the concatenation of the declaring layers' entries
in registry order, a throwaway layer declaring the hook joins, duplicates are refused, and every entry
runs on a tiny input with finite outputs of the right shape and an exact part inside its estimate."""
import math

import pytest
import torch

from sparsattn.eval.approx_quality import fidelity_rows, method_grid
from sparsattn.nn import base as nb
from sparsattn.nn import layer_class, list_layers
from sparsattn.nn.base import attention_backend, register_layer
from sparsattn.nn.mixers._approx_common import exact_lse, grid_entry

D = 8


def _declaring() -> list[str]:
    return [n for n in list_layers() if callable(getattr(layer_class(n), "fidelity_grid", None))]


def _keys(grid) -> list[tuple]:
    return [(g["method"], g["config"]) for g in grid]


def test_grid_is_the_registry_layers_entries_in_registry_order():
    names = _declaring()
    assert names, "no layer declares fidelity_grid"
    assert set(list_layers("approx")) <= set(names), "every approximation layer declares fidelity_grid"
    want = [k for n in names for k in _keys(layer_class(n).fidelity_grid(D, 0))]
    got = _keys(method_grid(D, 0))
    assert got == want
    assert len(set(got)) == len(got), "(method, config) pairs are unique"
    for n in names:  # labels come from the registered name: <name> or <name>-<variant>
        for m, _ in _keys(layer_class(n).fidelity_grid(D, 0)):
            assert m == n or m.startswith(n + "-"), (n, m)


class _Throwaway(nb.Layer):
    """A layer declaring only the hook: one exact-attention entry."""

    kind = "approx"

    def __init__(self, dim: int, heads: int):
        super().__init__()

    @classmethod
    def fidelity_grid(cls, D: int, seed: int = 0) -> list[dict]:
        run = lambda q, k, v, st: exact_lse(q, k, v, scale=q.shape[-1] ** -0.5, causal=True)  # noqa: E731
        return [grid_entry(cls.name, f"seed={seed}", run, lambda q, k, v: run(q, k, v, None)[1])]


def test_a_layer_declaring_the_hook_joins_and_duplicates_are_refused():
    base = _keys(method_grid(D, 3))
    register_layer("_throwaway_fidelity")(_Throwaway)
    try:
        got = _keys(method_grid(D, 3))
        assert ("_throwaway_fidelity", "seed=3") in got and len(got) == len(base) + 1
        assert got.index(("_throwaway_fidelity", "seed=3")) == 0  # registry order: sorted names
        register_layer("_throwaway_fidelity2")(type("_Twin", (_Throwaway,), {}))
        nb._REGISTRY["_throwaway_fidelity2"].name = "_throwaway_fidelity"  # same labels as the first
        with pytest.raises(ValueError, match="already given"):
            method_grid(D, 3)
    finally:
        nb._REGISTRY.pop("_throwaway_fidelity", None)
        nb._REGISTRY.pop("_throwaway_fidelity2", None)
    assert _keys(method_grid(D, 3)) == base


def test_hook_arguments_are_checked():
    for n in _declaring():
        with pytest.raises(ValueError, match="D"):
            layer_class(n).fidelity_grid(0, 0)
        with pytest.raises(ValueError, match="seed"):
            layer_class(n).fidelity_grid(D, -1)


def test_every_entry_runs_on_a_tiny_input():
    T = 300  # above the smallest min_seq_len / cluster sizes, so the approximations are exercised
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, D, generator=g) for _ in range(3))
    grid = method_grid(D, 0)
    with torch.no_grad(), attention_backend("reference"):
        for e in grid:
            st: dict = {}
            out, lse = e["run"](q, k, v, st)
            assert out.shape == (1, 2, T, D) and lse.shape == (1, 2, T), e["method"]
            key = (e["method"], e["config"])
            assert torch.isfinite(out).all() and not (lse.isnan() | (lse == math.inf)).any(), key
            assert st.get("pairs", 0.0) + st.get("lowrank", 0.0) > 0, key
            out2, lse2 = e["run"](q, k, v, None)
            assert torch.equal(out, out2) and torch.equal(lse, lse2), "an entry is deterministic"
            if e["exact_part"] is None:
                assert torch.isfinite(lse).all(), key
                continue
            part = e["exact_part"](q, k, v)
            assert part.shape == (1, 2, T) and not (part.isnan() | (part == math.inf)).any(), key
            # a row may have no exact pair (a causal LSH cluster of later keys only: lse -inf), but a row
            # whose estimate is empty has no exact pair either, and the exactly computed pairs are a part
            # of the estimate's normaliser
            assert (part[lse == -math.inf] == -math.inf).all(), key
            assert (part <= lse + 1e-4).all(), (key, float((part - lse).max()))
            assert torch.isfinite(part).any(), key
    rows = fidelity_rows({0: (q, k, v)}, {}, grid, log=lambda m: None)
    assert _keys(rows) == _keys(grid)
    for r, e in zip(rows, grid):
        assert 0 <= r["rel_err"] < math.inf
        assert (math.isnan(r["recall"]) if e["exact_part"] is None else 0 < r["recall"] <= 1 + 1e-6), r
