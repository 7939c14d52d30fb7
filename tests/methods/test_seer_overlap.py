"""SeerAttention gate with key-block overlap (``k_overlap``, a departure from SeerAttention, arXiv
2410.13276): overlap 0 is the paper's pooling, overlap pooling equals a plain loop, it is causal-safe,
it round-trips through the gate files, and bad values are refused."""
import json

import pytest
import torch

from sparsattn.methods.seer_attention import SeerAttention, SeerGate, _pool_blocks


def _x(B=1, H=2, T=333, D=8, seed=0, dtype=torch.float32):
    return torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _loop_pool(x, bs, overlap):
    """Reference: block j pools rows [max(0, j*bs - overlap if j else 0), min((j+1)*bs, T)) with max, min, mean."""
    B, H, T, D = x.shape
    out = []
    for j in range(-(-T // bs)):
        lo = j * bs - overlap if j else 0
        seg = x[:, :, lo:min((j + 1) * bs, T)].float()
        out.append(torch.cat([seg.amax(2), seg.amin(2), seg.mean(2)], -1))
    return torch.stack(out, 2)


def _old_pool(x, bs):
    """The pooling before k_overlap existed (block-aligned max/min/avg), written out independently."""
    return _loop_pool(x, bs, 0)


@pytest.mark.parametrize("T", [64, 100, 128, 333])
def test_overlap_zero_is_the_plain_pooling_exactly(T):
    x = _x(T=T)
    got = _pool_blocks(x, 64, ("max", "min", "avg"))
    assert torch.equal(got, _pool_blocks(x, 64, ("max", "min", "avg"), 0))
    torch.testing.assert_close(got, _old_pool(x, 64), rtol=1e-6, atol=1e-6)
    gate = SeerGate(4, 2, 8, 1, rope_input="post", seed=0)
    assert gate.k_overlap == 0
    assert torch.equal(gate.pool(_x(H=4, T=T), x)[1], got)


@pytest.mark.parametrize("T,overlap", [(33, 5), (64, 16), (65, 1), (200, 16), (333, 32), (333, 63), (256, 40)])
def test_overlap_pooling_equals_a_loop_reference(T, overlap):
    x = _x(T=T, seed=T + overlap)
    got = _pool_blocks(x, 64, ("max", "min", "avg"), overlap)
    torch.testing.assert_close(got, _loop_pool(x, 64, overlap), rtol=1e-5, atol=1e-5)
    # the gate's pool uses its k_overlap for keys only; queries stay block-averaged
    gate = SeerGate(4, 2, 8, 1, rope_input="post", seed=0, k_overlap=overlap)
    q = _x(H=4, T=T, seed=1)
    qp, kp = gate.pool(q, x)
    torch.testing.assert_close(kp, got)
    torch.testing.assert_close(qp, _pool_blocks(q, 64, ("avg",)))
    # bfloat16 keys: the same as pooling their float32 values
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(_pool_blocks(xb, 64, ("max", "min", "avg"), overlap),
                               _loop_pool(xb.float(), 64, overlap), rtol=1e-5, atol=1e-5)


def test_overlap_changes_only_blocks_after_the_first_and_only_through_the_tail():
    x = _x(T=256)
    a = _pool_blocks(x, 64, ("max", "min", "avg"), 16)
    b = _pool_blocks(x, 64, ("max", "min", "avg"), 0)
    assert torch.equal(a[:, :, 0], b[:, :, 0]) and not torch.allclose(a[:, :, 1:], b[:, :, 1:])
    y = x.clone()
    y[:, :, 64:112] += 100.0  # rows of block 1 outside block 2's overlap (rows 112-127)
    assert torch.equal(_pool_blocks(y, 64, ("max", "min", "avg"), 16)[:, :, 2], a[:, :, 2])


@pytest.mark.parametrize("overlap", [0, 8, 32, 63])
def test_overlap_is_causal(overlap):
    T, bs = 300, 64
    x = _x(T=T, seed=3)
    base = _pool_blocks(x, bs, ("max", "min", "avg"), overlap)
    for j in range(-(-T // bs)):
        y = x.clone()
        y[:, :, (j + 1) * bs:] = torch.randn_like(y[:, :, (j + 1) * bs:]) * 50
        got = _pool_blocks(y, bs, ("max", "min", "avg"), overlap)
        assert torch.equal(got[:, :, : j + 1], base[:, :, : j + 1]), j
    # and through the gate's scores: block j's column never depends on keys at or after (j + 1) * bs
    gate = SeerGate(4, 2, 8, [0], rope_input="post", seed=2, k_overlap=overlap)
    q = _x(H=4, T=T, seed=4)
    s = gate.scores(0, q, x)
    y = x.clone()
    y[:, :, 2 * bs:] += 7.0
    s2 = gate.scores(0, q, y)
    assert torch.equal(s[..., :2], s2[..., :2])


def test_overlap_round_trips_through_the_gate_files(tmp_path):
    gate = SeerGate(4, 2, 8, [0, 2], rope_input="post", seed=1, k_overlap=24)
    gate.save(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["k_overlap"] == 24
    back = SeerGate.load(tmp_path / "g")
    assert back.k_overlap == 24 and back.config() == gate.config()
    m = SeerAttention(path=str(tmp_path / "g"), nz_ratio=0.5, last_block_dense=False)
    q, k = _x(H=4, T=300, seed=5), _x(T=300, seed=6)
    from sparsattn.methods.base import SelectContext
    torch.testing.assert_close(m.block_logits(q, k, SelectContext(layer=2)), gate.scores(2, q, k))
    assert m.gate.k_overlap == 24
    # a gate file written before the field existed loads as 0
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    del cfg["k_overlap"]
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    assert SeerGate.load(tmp_path / "g").k_overlap == 0
    # a bad value in the file is refused naming the file and the field
    cfg["k_overlap"] = 64
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="k_overlap") as e:
        SeerGate.load(tmp_path / "g")
    assert "config.json" in str(e.value)


def test_shipped_gate_loads_with_overlap_zero():
    from sparsattn.models import bundled_path

    gate = SeerGate.load(bundled_path() / "calibration" / "seer_gate")
    assert gate.k_overlap == 0


@pytest.mark.parametrize("bad", [-1, 64, 100, 1.5, True, "8"])
def test_bad_overlap_values_are_refused(bad):
    with pytest.raises(ValueError, match="k_overlap"):
        SeerGate(4, 2, 8, 1, k_overlap=bad)
