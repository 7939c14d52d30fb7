import pytest

import sparsattn.models as models


def test_bundled_path_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "BUNDLED_DIR", tmp_path / "bundled")
    with pytest.raises(ValueError, match="python -m sparsattn.train.lm") as e:
        models.bundled_path()
    assert isinstance(e.value, FileNotFoundError) and "config.json" in str(e.value)
    d = tmp_path / "bundled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="safetensors"):
        models.bundled_path()
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    assert models.bundled_path() == d
