"""Test configuration: Triton kernels run through the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Fixed seed; NaN-poisoned kernel outputs; one intra-op thread per test process (CI runs
    two xdist workers on two cores, and small tensors only lose to OpenMP spin-waits)."""
    torch.manual_seed(1234)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from sparsattn.kernels import block_sparse

    block_sparse.POISON_OUTPUTS = True
    yield
    block_sparse.POISON_OUTPUTS = False
    torch.set_num_threads(n_threads)


@pytest.fixture
def decode_patterns(monkeypatch):
    """The patterns given to ``sparse_decode_attention`` during the test, in call order (a spy that
    still runs the real function; ``.clear()`` it to count from a later point)."""
    import sparsattn.kernels.sparse_decode as sd

    pats = []
    real = sd.sparse_decode_attention

    def spy(*a, **kw):
        pats.append(a[3] if len(a) > 3 else kw.get("pattern"))
        return real(*a, **kw)

    monkeypatch.setattr(sd, "sparse_decode_attention", spy)
    return pats
