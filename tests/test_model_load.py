"""sparsattn.models.load: the one model loader (issue 11) and ``sparsattn eval``'s Hub names,
``--device-map`` and ``--chat-template`` (issue 16, item 5). Offline: Hub loads are mocked."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the 'hf' extra (always installed by the 'test' extra)

from sparsattn import evaluate  # noqa: E402
from sparsattn.calibrate import _common as calib_common  # noqa: E402
from sparsattn.models import load as mload  # noqa: E402


class _Called(Exception):
    pass


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace from_pretrained of the Auto classes: record the call, then stop with ``_Called``."""
    calls = []

    def fake(name, **kw):
        calls.append((name, kw))
        raise _Called(name)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(fake))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(fake))
    return calls


def test_hub_name_needs_allow_download(fake_hub):
    with pytest.raises(ValueError, match="allow_download=True"):
        mload.load_model("someone/some-model")
    assert fake_hub == []  # refused before anything is loaded
    with pytest.raises(_Called):
        mload.load_model("someone/some-model", allow_download=True, device="cpu")
    name, kw = fake_hub[0]
    assert name == "someone/some-model" and kw["local_files_only"] is False and kw["dtype"] is torch.float32


def test_local_paths_never_go_to_the_hub(tmp_path, fake_hub):
    with pytest.raises(mload.ModelPathError, match="does not exist"):
        mload.load_model(str(tmp_path / "missing"), allow_download=True)
    with pytest.raises(mload.ModelPathError, match="does not exist"):
        mload.load_model("./not/here/either", allow_download=True)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(mload.ModelPathError, match="holds no model weights"):
        mload.load_model(tmp_path)
    with pytest.raises(ValueError, match="padding_side"):
        mload.load_model(None, padding_side="middle")
    with pytest.raises(ValueError, match="dtype"):
        mload.load_model(None, dtype="float33")
    assert fake_hub == []


def test_one_loader_behind_the_old_names(fake_hub):
    assert evaluate.load_model is mload.load_model
    assert evaluate.ModelPathError is mload.ModelPathError
    with pytest.raises(ValueError, match="allow_download"):
        calib_common.load_model("someone/some-model")
    with pytest.raises(_Called):
        calib_common.load_model("someone/some-model", allow_download=True)
    assert fake_hub[0][1]["dtype"] is torch.float32


def test_device_map_is_passed_and_placement_left_to_transformers(fake_hub):
    with pytest.raises(_Called):
        mload.load_model("someone/some-model", allow_download=True, device_map="auto")
    kw = fake_hub[0][1]
    assert kw["device_map"] == "auto" and kw["dtype"] == "auto"


def test_bundled_model_with_device_map_cpu():
    pytest.importorskip("accelerate")  # device_map needs accelerate (the 'eval' extra)
    model, tok, src = mload.load_model(device_map="cpu")
    from sparsattn.models import bundled_path

    assert src == bundled_path() and model.dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu" and not model.training
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_eval_cli_hub_name(fake_hub, tmp_path, capsys):
    out = str(tmp_path / "ev")
    assert evaluate.main(["--model", "someone/some-model", "--methods", "dense", "--out", out,
                          "--device", "cpu", "--no-progress"]) == 2
    assert "--allow-download" in capsys.readouterr().err and fake_hub == []
    with pytest.raises(_Called):
        evaluate.main(["--model", "someone/some-model", "--allow-download", "--methods", "dense", "--out", out,
                       "--device", "cpu", "--no-progress", "--device-map", "auto", "--dtype", "bfloat16"])
    name, kw = fake_hub[0]
    assert name == "someone/some-model" and kw["device_map"] == "auto" and kw["dtype"] is torch.bfloat16


def test_chat_template(monkeypatch, tmp_path):
    from tests.test_evaluate import make_tiny_model

    path = make_tiny_model(tmp_path / "tiny")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # the tiny tokenizer has no chat template: refused before any sample is generated
    with pytest.raises(ValueError, match="no chat template"):
        evaluate.run_eval(path, methods=["dense"], lengths=[64], n_samples=1, out_dir=tmp_path / "a",
                          progress=False, fidelity=False, chat_template=True)

    real_load = evaluate.load_model

    def load_with_template(*a, **kw):
        model, tok, p = real_load(*a, **kw)
        tok.chat_template = "{% for m in messages %}<U>{{ m['content'] }}</U>{% endfor %}" \
                            "{% if add_generation_prompt %}<A>{% endif %}"
        return model, tok, p

    seen = []

    def fake_generate(model, tok, prompts, *, device, max_new_tokens, add_special_tokens=True):
        seen.extend((p, add_special_tokens) for p in prompts)
        return ["" for _ in prompts]

    monkeypatch.setattr(evaluate, "load_model", load_with_template)
    monkeypatch.setattr(evaluate, "_generate", fake_generate)
    evaluate.run_eval(path, methods=["dense"], lengths=[128], n_samples=2, out_dir=tmp_path / "b",
                      progress=False, fidelity=False, chat_template=True, show=False)
    assert len(seen) == 2
    for p, special in seen:
        assert p.startswith("<U>") and p.endswith("</U><A>") and special is False
    seen.clear()
    evaluate.run_eval(path, methods=["dense"], lengths=[128], n_samples=1, out_dir=tmp_path / "c",
                      progress=False, fidelity=False, show=False)
    assert not seen[0][0].startswith("<U>") and seen[0][1] is True
