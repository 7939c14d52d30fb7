import pytest
import torch

from sparsattn.methods import get_method
from sparsattn.methods.base import SelectContext

from _sparse_decode_utils import assert_equals_dense, needle_case, selects


def test_sinks_and_window_per_sequence_length():
    q, k, v, pos = needle_case(T=300)
    m = get_method("streaming_llm", n_sink=4, window=16)
    kl = torch.tensor([300, 100])
    p = m.select(q, k, SelectContext(extras={"kv_lens": kl}))
    tm = p.to_token_mask()
    assert p.heads == 2 and p.indices.dtype == torch.int32
    assert tm[0, 0].nonzero().flatten().tolist() == list(range(4)) + list(range(284, 300))
    assert tm[1, 1].nonzero().flatten().tolist() == list(range(4)) + list(range(84, 100))
    assert_equals_dense(q, k, v, get_method("streaming_llm", window=300).select(q, k, SelectContext(extras={"kv_lens": kl})), kl)


def test_position_only_misses_the_needle():
    q, k, v, pos = needle_case()
    p = get_method("streaming_llm", n_sink=4, window=60).select(q, k)
    assert not any(selects(p, b, h, pos[b]) for b in range(2) for h in range(2))


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="window"):
        get_method("streaming_llm", window=0)
    with pytest.raises(ValueError, match="q"):
        get_method("streaming_llm").select(torch.randn(2, 4, 3, 8), torch.randn(2, 2, 10, 8))
