"""``sparsattn list`` says which kernel backends can run on this machine, and why not (issue 16)."""
from __future__ import annotations

import torch

from sparsattn import cli
from sparsattn.kernels import backends


def test_list_shows_backend_availability(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "kernel backends on this machine" in out
    rows = backends.describe()
    assert {(r["family"], r["backend"]) for r in rows} == {(f, b) for f, fams in backends.TABLE.items() for b in fams}
    for r in rows:  # every backend of every family has a line with yes/no and its reason
        line = next(l for l in out.splitlines() if l.split()[:2] in ([r["family"], r["backend"]],
                                                                     [r["family"], "*" + r["backend"]]))
        assert ("yes" if r["can_run"] else "no") in line.split() and r["reason"] in line
    # exactly one automatic choice per family, and it can run
    for fam in backends.TABLE:
        chosen = [r for r in rows if r["family"] == fam and r["default"]]
        assert len(chosen) == 1 and chosen[0]["can_run"]
    if not torch.cuda.is_available():
        tri = next(r for r in rows if r["family"] == "block_sparse" and r["backend"] == "triton")
        assert not tri["can_run"] and "TRITON_INTERPRET" in tri["reason"]
