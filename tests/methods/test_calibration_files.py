"""Every calibrated method's file loader refuses a bad file with a ValueError naming the file (and the
field): binary files, truncated files, wrong types in every field, missing fields, corrupt or
misshapen safetensors (issue 10, section 2). One checked loader in sparsattn.calibration makes this
hold for every method; here each loader is fuzzed: a valid file truncated at several offsets, and
each JSON value replaced by values of other types."""
from __future__ import annotations

import json
import os

import pytest
import torch

from sparsattn.calibration import Field, ModelShape, read_json, read_safetensors, save_calibration
from sparsattn.methods.double_sparsity import DoubleSparsity
from sparsattn.methods.minference import MInference
from sparsattn.methods.moa import MoA
from sparsattn.methods.razor import RazorAttention
from sparsattn.methods.seer_attention import SeerGate

SHAPE = ModelShape(2, 2, 1, 16)  # 2 layers, 2 query heads, 1 KV head, head_dim 16


def _minference(tmp_path):
    data = {str(l): {"0": {"type": "a_shape", "n_init": 4, "n_local": 32, "score": 0.5, "density": 0.2},
                     "1": {"type": "vertical_slash", "v_size": 8, "s_size": 16}} for l in range(2)}
    p = save_calibration(tmp_path / "minference.json", "minference", SHAPE, data, {"block_size": 64})
    return p, lambda path: MInference(path=str(path))


def _razor(tmp_path):
    data = {str(l): {"retrieval_heads": [1], "echo": [0.1, 0.2], "induction": [0.3, 0.0]} for l in range(2)}
    p = save_calibration(tmp_path / "razor.json", "razor", SHAPE, data)
    return p, lambda path: RazorAttention(path=str(path))


def _moa(tmp_path):
    m = MoA().set_plan(SHAPE, [[64.0, 128.0], [0.0, 32.0]], [[0.5, 0.25], [1.0, 0.0]], sink=16, min_span=8,
                       info={"note": "test"})
    p = m.save_plan(tmp_path / "moa.json")
    return p, lambda path: MoA().load_plan(path)


def _double_sparsity(tmp_path):
    m = DoubleSparsity(channels={0: [[1, 5, 7]], 1: [[0, 2, 3]]})
    p = str(tmp_path / "ds.json")
    m.save(p)
    return p, lambda path: DoubleSparsity().load(str(path))


def _seer(tmp_path):
    gate = SeerGate(2, 1, 16, 2, hidden_size=8, seed=0)
    d = gate.save(tmp_path / "gate")
    return str(d / "config.json"), lambda path: SeerGate.load(os.path.dirname(path))


JSON_FILES = {"minference": _minference, "razor": _razor, "moa": _moa, "double_sparsity": _double_sparsity,
              "seer_config": _seer}


def _refused(load, path, field_path: str | None = None):
    """``load(path)`` raises ValueError naming the path (and a prefix of ``field_path``), nothing else."""
    with pytest.raises(ValueError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg or os.path.dirname(str(path)) in msg, msg
    if field_path:
        assert _names_field(msg, field_path), (field_path, msg)
    return msg


def _names_field(msg: str, field_path: str) -> bool:
    """The message names the field or one of its parents (at least two levels deep when it has two)."""
    parts = _split(field_path)
    need = min(2, len(parts))
    for n in range(len(parts), need - 1, -1):
        if _join(parts[:n]) in msg:
            return True
    return parts[0] in ("format", "method", "version") and parts[0] in msg


def _split(path: str) -> list:
    out = []
    for piece in path.split("."):
        head, *idx = piece.split("[")
        out.append(head)
        out += ["[" + i for i in idx]
    return out


def _join(parts: list) -> str:
    s = ""
    for p in parts:
        s += p if p.startswith("[") or not s else "." + p
    return s


def _leaves(value, path=""):
    """Every (field path, value) of a JSON document, containers included (paths written as Field does)."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")


def _set(doc, parts, new):
    cur = doc
    for p in parts[:-1]:
        cur = cur[int(p[1:-1])] if p.startswith("[") else cur[p]
    last = parts[-1]
    if last.startswith("["):
        cur[int(last[1:-1])] = new
    else:
        cur[last] = new


_FLIPS = ["x", 1.5, -3, True, None, [], {}, [["x"]], float("nan")]


@pytest.mark.parametrize("kind", sorted(JSON_FILES))
def test_binary_truncated_and_missing_files_are_refused_naming_the_file(tmp_path, kind):
    path, load = JSON_FILES[kind](tmp_path)
    load(path)  # the valid file loads
    raw = open(path, "rb").read()
    for cut in sorted({1, len(raw) // 7, len(raw) // 3, len(raw) // 2, len(raw) - 2, len(raw) - 1}):
        with open(path, "wb") as f:
            f.write(raw[:cut])
        _refused(load, path)
    with open(path, "wb") as f:
        f.write(b"\x80\x81\xfe\xff" + os.urandom(64))  # not UTF-8: a binary file
    assert "UTF-8" in _refused(load, path)
    with open(path, "wb") as f:
        f.write(b"")
    _refused(load, path)
    with open(path, "w") as f:
        f.write(json.dumps([1, 2, 3]))  # a JSON list where an object is expected
    _refused(load, path)
    os.remove(path)
    assert "does not exist" in _refused(load, path)


@pytest.mark.parametrize("kind", sorted(JSON_FILES))
def test_every_field_with_a_wrong_type_is_refused_naming_file_and_field(tmp_path, kind):
    path, load = JSON_FILES[kind](tmp_path)
    doc = json.loads(open(path).read())
    n_refused = 0
    for field_path, value in list(_leaves(doc))[1:]:
        if field_path.startswith(("config", "model_info", "data.info")) or ".model_info" in field_path:
            continue  # free-form records, not read by the loaders
        for new in _FLIPS:
            if type(new) is type(value) and new == value:
                continue
            bad = json.loads(json.dumps(doc))
            _set(bad, _split(field_path), new)
            with open(path, "w") as f:
                f.write(json.dumps(bad))  # allow_nan: the NaN flip writes the token NaN
            try:
                load(path)
            except ValueError as e:
                msg = str(e)
                assert str(path) in msg or os.path.dirname(str(path)) in msg, (field_path, new, msg)
                assert _names_field(msg, field_path), (field_path, new, msg)
                n_refused += 1
            # other exceptions propagate and fail the test; a load that succeeds must have a valid value
    assert n_refused > 10
    # a missing field is named too
    for field_path, _ in list(_leaves(doc))[1:]:
        parts = _split(field_path)
        if parts[-1].startswith("[") or field_path.startswith("config") or "info" in field_path:
            continue
        bad = json.loads(json.dumps(doc))
        parent = bad
        for p in parts[:-1]:
            parent = parent[int(p[1:-1])] if p.startswith("[") else parent[p]
        del parent[parts[-1]]
        with open(path, "w") as f:
            f.write(json.dumps(bad))
        try:
            load(path)
        except ValueError as e:
            assert str(path) in str(e) or os.path.dirname(str(path)) in str(e), (field_path, str(e))


def test_issue_examples(tmp_path):
    # wrong types inside a calibration / MoA plan (were: invalid literal for int(), too many dimensions 'str')
    p, load = _moa(tmp_path)
    doc = json.loads(open(p).read())
    doc["data"]["sink"] = "abc"
    open(p, "w").write(json.dumps(doc))
    assert "data.sink" in _refused(load, p)
    doc["data"]["sink"] = 16
    doc["data"]["alpha"][1][0] = "big"
    open(p, "w").write(json.dumps(doc))
    assert "data.alpha[1][0]" in _refused(load, p)
    doc = json.loads(open(p).read())
    doc["model_shape"]["num_heads"] = "2"
    open(p, "w").write(json.dumps(doc))
    assert "model_shape.num_heads" in _refused(load, p)
    p, load = _minference(tmp_path)
    doc = json.loads(open(p).read())
    doc["data"]["1"]["0"]["n_local"] = "32"
    open(p, "w").write(json.dumps(doc))
    assert "data.1.0.n_local" in _refused(load, p)
    # SeerAttention gate: a config.json without a field, and a truncated / misshapen gate.safetensors
    gp, load = _seer(tmp_path)
    cfg = json.loads(open(gp).read())
    del cfg["head_dim"]
    open(gp, "w").write(json.dumps(cfg))
    assert "head_dim" in _refused(load, gp)
    # Double Sparsity: a JSON list and a truncated file
    dp, load = _double_sparsity(tmp_path)
    raw = open(dp).read()
    open(dp, "w").write(raw[: len(raw) // 2])
    assert "not valid JSON" in _refused(load, dp)
    open(dp, "w").write("[1, 2]")
    _refused(load, dp)
    open(dp, "w").write(json.dumps({"method": "double_sparsity", "channels": {"0": [[1, 2], [3]]}}))
    assert "channels.0[1]" in _refused(load, dp)


def test_gate_safetensors_bad_files(tmp_path):
    from safetensors.torch import save_file

    gp, _ = _seer(tmp_path)
    d = os.path.dirname(gp)
    w = os.path.join(d, "gate.safetensors")
    raw = open(w, "rb").read()
    good = read_safetensors(w)
    for cut in (0, 7, 100, len(raw) // 2, len(raw) - 1):
        open(w, "wb").write(raw[:cut])
        msg = _refused(lambda _p: SeerGate.load(d), w)
        assert "gate.safetensors" in msg
    variants = {
        "missing": {k: v for k, v in good.items() if k != "wq.1"},
        "shape": {**good, "wq.1": torch.zeros(3, 3)},
        "dtype": {**good, "wk.0": good["wk.0"].to(torch.int32)},
        "nan": {**good, "head_inv_freq": torch.full_like(good["head_inv_freq"], float("nan"))},
    }
    for name, tensors in variants.items():
        save_file(tensors, w)
        msg = _refused(lambda _p: SeerGate.load(d), w)
        key = {"missing": "wq.1", "shape": "wq.1", "dtype": "wk.0", "nan": "head_inv_freq"}[name]
        assert key in msg, (name, msg)
    save_file(good, w)
    SeerGate.load(d)


def test_field_accessors_name_file_and_path():
    f = Field({"data": {"layers": {"3": {"heads": [1, "x"]}}}}, "cal.json")
    assert f["data"]["layers"]["3"]["heads"][0].as_int() == 1
    with pytest.raises(ValueError, match=r"cal\.json: field data\.layers\.3\.heads\[1\]: expected an integer"):
        f["data"]["layers"]["3"]["heads"][1].as_int()
    with pytest.raises(ValueError, match=r"field data\.layers\.4: missing"):
        f["data"]["layers"]["4"]
    with pytest.raises(ValueError, match=r"keys that are integers"):
        Field({"a": 1}, "c.json").int_keys()
    with pytest.raises(ValueError, match="finite"):
        Field(float("inf"), "c.json", "x").as_float()
    assert Field(3.0, "c.json").as_int() == 3


def test_read_json_messages(tmp_path):
    p = tmp_path / "x.json"
    with pytest.raises(ValueError, match="does not exist"):
        read_json(p)
    with pytest.raises(ValueError, match="not a file"):
        read_json(tmp_path)
    p.write_text('{"a": [1, 2')
    with pytest.raises(ValueError, match="truncated"):
        read_json(p)
    with pytest.raises(ValueError, match="nested too deeply"):
        p.write_text("[" * 100000 + "]" * 100000)
        read_json(p)


def test_model_shape_from_dict_takes_integer_scalars_and_refuses_other_types():
    import numpy as np

    s = ModelShape.from_dict({"num_layers": np.int64(2), "num_heads": torch.tensor(4), "num_kv_heads": 2,
                              "head_dim": 16})
    assert s == ModelShape(2, 4, 2, 16)
    for bad in ("4", 4.5, True, None):
        with pytest.raises(ValueError, match="model_shape.num_layers"):  # was int('x') / silent int(4.5) == 4
            ModelShape.from_dict({"num_layers": bad, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16})
