"""methods._select: the lengths memo of decode_inputs and the incremental-state helpers."""
import pytest
import torch

from sparsattn.methods._select import decode_inputs, lengths_since, record_lengths
from sparsattn.methods.base import SelectContext


def test_decode_inputs_checks_each_lengths_tensor_once_but_sees_in_place_changes():
    q, k = torch.randn(2, 4, 8), torch.randn(2, 2, 50, 8)
    kl = torch.tensor([50, 20], dtype=torch.int32)
    ctx = SelectContext(extras={"kv_lens": kl})
    a = decode_inputs(q, k, ctx)[2]
    b = decode_inputs(q, k, ctx)[2]
    assert a is b and a.dtype == torch.long and a.tolist() == [50, 20]  # memo: same checked tensor
    kl[1] = 51  # in place: a new version, checked again
    with pytest.raises(ValueError, match="kv_lens"):
        decode_inputs(q, k, ctx)
    kl[1] = 7
    assert decode_inputs(q, k, ctx)[2].tolist() == [50, 7]
    with pytest.raises(ValueError, match="kv_lens"):  # a shorter cache than the memo was checked for
        decode_inputs(q, k[:, :, :30], ctx)
    with pytest.raises(ValueError, match="kv_lens"):
        decode_inputs(q, k, SelectContext(extras={"kv_lens": torch.tensor([1, 2, 3])}))


def test_lengths_since():
    kl = torch.tensor([5, 9])
    assert lengths_since(None, kl) == (False, 0, 9)
    st = {}
    record_lengths(st, kl)
    assert lengths_since(st, kl) == (True, 0, 0)  # the very tensor: nothing appended, no sync
    assert lengths_since(st, torch.tensor([7, 12])) == (True, 5, 12)
    assert lengths_since(st, torch.tensor([4, 12])) == (False, 0, 12)  # a sequence got shorter
    kl += 1
    assert lengths_since(st, kl) == (True, 5, 10)  # same object, new version
    assert lengths_since(st, torch.tensor([1, 2, 3]))[0] is False  # another batch


def test_inference_mode_tensors_are_checked_every_time():
    """Inference tensors keep no version counter: nothing is memoised, every call checks."""
    q, k = torch.randn(2, 4, 8), torch.randn(2, 2, 50, 8)
    with torch.inference_mode():
        kl = torch.tensor([50, 20])
        ctx = SelectContext(extras={"kv_lens": kl})
        assert decode_inputs(q, k, ctx)[2].tolist() == [50, 20]
        kl[0] = 60
        with pytest.raises(ValueError, match="kv_lens"):
            decode_inputs(q, k, ctx)
        st = {}
        record_lengths(st, kl)
        kl[0] = 70
        assert lengths_since(st, kl) == (True, 20, 70)
