"""sparsattn.calibration: JSON round trip and refusal of other model shapes / methods / formats."""
import json

import pytest
import torch

from sparsattn.calibration import ModelShape, check_shape, load_calibration, save_calibration


def test_round_trip(tmp_path):
    shape = ModelShape(4, 8, 2, 64)
    data = {"0": {"1": {"type": "a_shape", "score": 0.5}}}
    p = save_calibration(tmp_path / "c.json", "minference", shape, data, {"block_size": 64})
    s2, d2, cfg = load_calibration(p, method="minference", expect_shape=shape)
    assert s2 == shape and d2 == data and cfg == {"block_size": 64}


def test_refusals(tmp_path):
    shape = ModelShape(4, 8, 2, 64)
    p = save_calibration(tmp_path / "c.json", "razor", shape, {"x": 1})
    with pytest.raises(ValueError, match="num_kv_heads"):
        load_calibration(p, expect_shape=ModelShape(4, 8, 4, 64))
    with pytest.raises(ValueError, match="head_dim"):
        load_calibration(p, expect_shape={"num_layers": 4, "num_heads": 8, "num_kv_heads": 2, "head_dim": 128})
    with pytest.raises(ValueError, match="method"):
        load_calibration(p, method="minference")
    with pytest.raises(ValueError, match="finite"):
        save_calibration(tmp_path / "d.json", "razor", shape, {"x": float("nan")})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a sparsattn calibration"):
        load_calibration(bad)
    with pytest.raises(ValueError, match="path"):
        load_calibration(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelShape(4, 8, 3, 64)


def test_check_qk_and_from_captured():
    q, k = torch.zeros(1, 8, 10, 64), torch.zeros(1, 2, 10, 64)
    s = ModelShape.from_captured({0: (q, k), 3: (q, k)})
    assert s == ModelShape(4, 8, 2, 64)
    s.check_qk(q, k, 3)
    with pytest.raises(ValueError, match="num_heads"):
        s.check_qk(torch.zeros(1, 4, 10, 64), k, 0)
    with pytest.raises(ValueError, match="ctx.layer"):
        s.check_qk(q, k, 4)
    with pytest.raises(ValueError, match="num_layers"):
        check_shape(s, ModelShape(5, 8, 2, 64))
