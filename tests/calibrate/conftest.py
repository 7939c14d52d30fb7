"""Shared fixtures of the calibration tests: the bundled tokenizer and a tiny random Llama with the
bundled model's vocabulary (a test module may define its own ``tiny``)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")

    from sparsattn.models import bundled_path

    return transformers.AutoTokenizer.from_pretrained(str(bundled_path()), local_files_only=True)


@pytest.fixture(scope="module")
def tiny():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=8192, max_position_embeddings=1024)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()
