"""sparsattn.evaluate: the method x task x length grid on a tiny random Llama (CPU, offline)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from sparsattn import evaluate
from sparsattn.evaluate import COLUMNS, SAMPLE_COLUMNS, ModelPathError, run_eval


def _tokenizer_texts() -> list[str]:
    from sparsattn.eval import tasks
    return [" ".join(tasks.NOISE_SENTENCES) * 4, tasks.NEEDLE_TEMPLATE, tasks.QUESTION_TEMPLATE, tasks.PREAMBLE,
            "0 1 2 3 4 5 6 7 8 9 " * 20, "magic number special text provided mentioned memorize quiz"] * 4


def make_tiny_model(path: Path, *, layers: int = 2, max_pos: int = 1024) -> Path:
    """A randomly initialised LlamaForCausalLM (GQA 4/2, head_dim 16) + a BPE tokenizer trained here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsattn.train.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(_tokenizer_texts(), vocab_size=600, min_frequency=1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_pos,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    save_tokenizer(tok, path)
    return path


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread (on a loaded 2-core runner two spinning threads make tiny matmuls ~100x
    slower) and the plain-torch reference kernel instead of the Triton interpreter (tested elsewhere;
    through the interpreter a 256-token generation takes minutes)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_grid_end_to_end(tiny_path, tmp_path):
    out = tmp_path / "ev"
    rows = run_eval(tiny_path, methods=["dense", "a_shape"], tasks=["passkey"], lengths=[256], n_samples=2,
                    method_config={"a_shape": {"n_init": 16, "n_local": 48, "block_size": 16}},
                    out_dir=out, batch_size=2, progress=False, fidelity=True, fidelity_layers=[0, 1], fidelity_rows=128)
    assert [(r["method"], r["task"], r["length"]) for r in rows] == [("dense", "passkey", 256), ("a_shape", "passkey", 256)]
    csv_rows = _read(out / "eval.csv")
    assert list(csv_rows[0]) == COLUMNS and len(csv_rows) == 2
    samp = _read(out / "eval_samples.csv")
    assert list(samp[0]) == SAMPLE_COLUMNS and len(samp) == 4
    assert {s["depth"] for s in samp} == {"0.0", "1.0"}
    for name in ("accuracy_vs_density.png", "accuracy_vs_speedup.png", "needle_heatmap_passkey.png"):
        assert (out / name).stat().st_size > 1000
    dense, ash = rows
    assert dense["speedup_vs_dense"] == 1.0
    assert ash["speedup_vs_dense"] == round(dense["seconds"] / ash["seconds"], 4)
    assert dense["density"] == 1.0 and dense["recall"] == 1.0
    # a_shape at 256 tokens with sink 16 + local 48: well under half of the causal pairs in the
    # patterns used during generation; on the last 128 rows (fidelity) 64 of ~190 keys on average
    assert 0.1 < ash["density"] < 0.6, ash
    assert 0.2 < ash["fid_density"] < 0.5, ash
    assert 0.0 < ash["recall"] < 1.0 and 0.0 < ash["topk_recall"] <= 1.0 and ash["rel_error"] > 0
    assert ash["fid_layers"] == "0 1"
    assert json.loads(ash["config"])["n_local"] == 48
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 100.0 and r["n_samples"] == 2 and r["n_tokens"] <= 256


def test_sparse_generation_matches_dense_when_pattern_is_full(tiny_path, tmp_path):
    """a_shape whose local window covers the whole prompt is dense: same greedy answers as unpatched."""
    run_eval(tiny_path, methods=["dense", "a_shape"], tasks=["passkey"], lengths=[128], n_samples=2,
             method_config={"a_shape": {"n_init": 16, "n_local": 512, "block_size": 16}}, out_dir=tmp_path,
             batch_size=2, progress=False, fidelity=False)
    samp = _read(tmp_path / "eval_samples.csv")
    by = {}
    for s in samp:
        by.setdefault(s["method"], []).append(s["prediction"])
    assert by["dense"] == by["a_shape"]
    rows = _read(tmp_path / "eval.csv")
    assert all(r["recall"] == "" for r in rows)  # no fidelity requested
    assert float(rows[1]["density"]) == pytest.approx(1.0)


def test_unknown_names_list_valid(tiny_path, tmp_path):
    with pytest.raises(ValueError, match="valid methods.*a_shape"):
        run_eval(tiny_path, methods=["dense", "no_such_method"], out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="valid names.*passkey"):
        run_eval(tiny_path, tasks=["no_such_task"], out_dir=tmp_path, progress=False)
    assert evaluate.main(["--model", str(tiny_path), "--methods", "nope", "--out", str(tmp_path)]) == 2


def test_bad_model_paths(tmp_path, capsys):
    with pytest.raises(ModelPathError, match="does not exist"):
        run_eval(tmp_path / "missing", methods=["dense"], lengths=[64], out_dir=tmp_path, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelPathError, match="holds no model weights"):
        run_eval(empty, methods=["dense"], lengths=[64], out_dir=tmp_path, progress=False)
    assert isinstance(ModelPathError("x"), FileNotFoundError)
    assert evaluate.main(["--model", str(empty), "--methods", "dense", "--out", str(tmp_path)]) == 2
    assert "holds no model weights" in capsys.readouterr().err


def test_methods_needing_fitting_are_skipped(capsys):
    res = evaluate.resolve_methods(["dense", "minference", "a_shape"], {})
    assert list(res) == ["dense", "a_shape"] and res["dense"] is None
    assert "skipping 'minference'" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not evaluated"):
        evaluate.resolve_methods(["dense"], {"a_shape": {"n_init": 4}})
    assert "--method-config" in evaluate.build_parser().format_help()


def test_cli_main(tiny_path, tmp_path):
    rc = evaluate.main(["--model", str(tiny_path), "--methods", "dense,block_sparse", "--tasks", "passkey",
                        "--lengths", "128", "--samples", "1", "--out", str(tmp_path), "--device", "cpu",
                        "--no-fidelity", "--no-progress", "--max-new-tokens", "4",
                        "--method-config", json.dumps({"block_sparse": {"top_k": 2, "block_size": 16}})])
    assert rc == 0
    rows = _read(tmp_path / "eval.csv")
    assert [r["method"] for r in rows] == ["dense", "block_sparse"]
    assert float(rows[1]["density"]) < 0.9
