"""Min-max (asymmetric) per-row quantisation: error bound, 4-bit packing layout, bad input."""
import pytest
import torch

from sparsattn.kv.quant import quantize_minmax, unpack4


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("D", [7, 8])
def test_minmax_round_trip_bound_and_bytes(bits, D):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, D, generator=gen) * torch.logspace(-2, 2, 5)[None, :, None] + 3.0
    q = quantize_minmax(x.to(torch.bfloat16), bits)
    xf = x.to(torch.bfloat16).float()
    err = (q.dequantize() - xf).abs()
    bound = q.scale.float() / 2 + 2 ** -10 * xf.abs().amax(-1, keepdim=True)
    assert bool((err <= bound + 1e-7).all()) and float(err.max()) > 0
    nb = (D + 1) // 2 if bits == 4 else D
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (3, 5, nb)
    assert q.nbytes() == 3 * 5 * (nb + 2 + 2)
    c = q.unpacked()
    assert int(c.max()) <= 2 ** bits - 1 and c.shape == (3, 5, D)
    # every row uses its full code range: min -> 0, max -> 2**bits - 1
    assert (c.amin(-1) == 0).all() and (c.amax(-1) == 2 ** bits - 1).all()


def test_pack_layout_low_nibble_first():
    packed = torch.tensor([[0x21, 0x03]], dtype=torch.uint8)
    assert unpack4(packed, 3).tolist() == [[1, 2, 3]]
    x = torch.tensor([[0.0, 15.0, 1.0, 2.0]])
    q = quantize_minmax(x, 4)
    assert q.codes.tolist() == [[0xF0, 0x21]] and float(q.scale) == 1.0 and float(q.zero) == 0.0


def test_minmax_constant_rows_and_bad_input():
    q = quantize_minmax(torch.full((2, 4), 1.5), 4)
    assert torch.equal(q.dequantize(), torch.full((2, 4), 1.5))
    with pytest.raises(ValueError, match="bits"):
        quantize_minmax(torch.randn(2, 4), 3)
    with pytest.raises(ValueError, match="x"):
        quantize_minmax(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(ValueError, match="x"):
        quantize_minmax(torch.ones(2, 4, dtype=torch.int32), 4)
