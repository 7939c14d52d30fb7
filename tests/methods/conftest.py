"""Fixtures shared by the method tests."""
import sys
from pathlib import Path

import pytest


@pytest.fixture
def hf_util():
    """tests/integrations/hf_testutil (tiny HF models, left padding, eager references) for the decode
    methods' tests through the Hugging Face integration."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
    try:
        import hf_testutil
        yield hf_testutil
    finally:
        sys.path.pop(0)
