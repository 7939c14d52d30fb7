"""kernels.merge.merge_lse: partial attention results merged by log-sum-exp."""
import pytest
import torch

from sparsattn.kernels.block_sparse.reference import dense_reference
from sparsattn.kernels.merge import merge_lse


def test_halves_merge_to_the_whole_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref, lref = dense_reference(q, k, v)
    parts = [dense_reference(q, k[:, :, a:z], v[:, :, a:z]) for a, z in ((0, 5), (5, 11), (11, 17))]
    out, lse = merge_lse(parts)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lref, atol=1e-12, rtol=1e-12)


def test_empty_parts_and_rows_give_zeros_without_nan_in_gradient():
    o1 = torch.randn(4, 3, requires_grad=True)
    l1 = torch.tensor([0.5, float("-inf"), 1.0, float("-inf")], requires_grad=True)
    o2 = torch.randn(4, 3, requires_grad=True)
    l2 = torch.tensor([float("-inf"), float("-inf"), 2.0, 3.0], requires_grad=True)
    out, lse = merge_lse([(o1, l1), (o2, l2)])
    assert torch.equal(out[1], torch.zeros(3)) and lse[1] == float("-inf")
    torch.testing.assert_close(out[0], o1[0].detach())
    torch.testing.assert_close(out[3], o2[3].detach())
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for t in (o1, l1, o2, l2):
        assert torch.isfinite(t.grad).all()


def test_bad_parts_raise():
    with pytest.raises(ValueError, match="parts"):
        merge_lse([])
    with pytest.raises(ValueError, match="parts\\[1\\]"):
        merge_lse([(torch.zeros(2, 3), torch.zeros(2)), (torch.zeros(2, 3), torch.zeros(3))])
