"""Fixtures of the HF integration tests (helpers live in hf_testutil.py)."""
from __future__ import annotations

import pytest
import torch

@pytest.fixture(autouse=True)
def _fast_cpu(request, monkeypatch):
    """Tiny models: one intra-op thread (no oversubscription on shared CI cores), and the torch
    reference kernels instead of the Triton interpreter (tests/conftest.py turns it on for kernel
    tests; these tests check the integration, the kernels are tested in tests/kernels). A test that
    requests the ``interpret`` fixture keeps the interpreter (one end-to-end run through Triton)."""
    from sparsattn.integrations import hf

    if "interpret" not in request.fixturenames and not torch.cuda.is_available():
        monkeypatch.setattr(hf, "DEFAULT_BACKEND", "reference")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def interpret():
    """Marks a test that runs the Triton kernels (interpreter on the CPU) end to end."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
