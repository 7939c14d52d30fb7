"""Context parallelism on 2 and 4 gloo processes (CPU) against single-process sparsattn.attention:
outputs, lse and gradients for causal / non-causal / per-head patterns, GQA, uneven and empty
shards, both layouts, every strategy; a mismatched pattern and a failed rank raise (no hang)."""
import pytest
import torch.distributed as dist

from ._cases import main_cases, stalled_rank
from ._harness import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _check(res, world):
    assert set(res) == set(range(world)), res
    for r, (status, out) in res.items():
        assert status == "ok", f"rank {r}: {status}\n{out}"
        assert not out["fails"], "\n".join(out["fails"][:20])


@pytest.mark.parametrize("world", [2, 4])
def test_equivalence_grid(world):
    """world 2 also runs one small case through the Triton kernels (TRITON_INTERPRET=1, set by
    tests/conftest.py on machines without a GPU, is inherited by the spawned ranks)."""
    _check(run_ranks(main_cases, world, deadline_s=150), world)


@pytest.mark.parametrize("mode", ["stalled", "dead"])
def test_failed_rank_raises(mode):
    res = run_ranks(stalled_rank, 2, mode, deadline_s=40, pg_timeout_s=10, wait_for=[0])
    status, out = res[0]
    assert status == "ok", out
    assert out["raised"] in ("RuntimeError", "ValueError"), out
    assert out["seconds"] < 15, out
