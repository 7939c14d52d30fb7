import email
import json
import math
from pathlib import Path

import pytest
import torch

from sparsattn.train.lm import (TrainConfig, _lr_at, build_parser, config_from_args, count_parameters, main,
                                model_config, parse_curriculum, save_checkpoint, validate_config)


MIB15 = 15 * 1024 * 1024
EMAIL_ROOT = Path(email.__file__).resolve().parent


def test_default_model_at_most_25m_parameters_and_16k_context():
    cfg = TrainConfig(out="x")
    conf = model_config(cfg)
    with torch.device("meta"):
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM(conf)
    n = count_parameters(model)
    assert 20_000_000 < n <= 25_000_000
    assert conf.max_position_embeddings >= 16384
    assert conf.num_attention_heads // conf.num_key_value_heads == 4  # GQA
    assert conf.tie_word_embeddings and conf.vocab_size == 8192
    rope = getattr(conf, "rope_parameters", None) or {"rope_theta": conf.rope_theta}
    assert rope["rope_theta"] >= 1e5
    assert max(p.seq_len for p in cfg.phases()) == 16384


def test_default_model_checkpoint_shards_under_15mib(tmp_path, tokenizer):
    cfg = TrainConfig(out=str(tmp_path))
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(cfg, vocab_size=len(tokenizer)))
    shards = save_checkpoint(model, tokenizer, tmp_path, dtype="bfloat16")
    assert len(shards) >= 3 and all(p.stat().st_size <= MIB15 for p in shards)
    from transformers import AutoModelForCausalLM
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
    assert again.dtype == torch.bfloat16
    sd = model.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, sd[k].to(torch.bfloat16)), k


def test_curriculum_and_config_validation():
    ph = parse_curriculum("1024:1:0.3,2048:3")
    assert [p.seq_len for p in ph] == [1024, 2048] and math.isclose(ph[1].frac, 0.75)
    assert ph[1].retrieval_share == 0.35
    for bad in ("1024", "10:1:0.3", "1024:0:0.3", "1024:1:1.5", "a:b"):
        with pytest.raises(ValueError, match="curriculum"):
            parse_curriculum(bad)
    with pytest.raises(ValueError, match="max_position"):
        validate_config(TrainConfig(out="x", max_position=8192))
    with pytest.raises(ValueError, match="heads"):
        validate_config(TrainConfig(out="x", heads=6, kv_heads=4))
    with pytest.raises(ValueError, match="selfcheck_lengths"):
        validate_config(TrainConfig(out="x", selfcheck_lengths="2048,32768"))


def test_lr_schedule():
    cfg = TrainConfig(out="x", lr=1e-3, min_lr_ratio=0.1)
    assert _lr_at(cfg, 0, 0.0, 10) == pytest.approx(1e-4)
    assert _lr_at(cfg, 9, 0.0, 10) == pytest.approx(1e-3)
    assert _lr_at(cfg, 1000, 0.5, 10) == pytest.approx(0.55e-3)
    assert _lr_at(cfg, 1000, 1.0, 10) == pytest.approx(1e-4)
    assert _lr_at(cfg, 1000, 1.7, 10) == pytest.approx(1e-4)


def test_parser_and_tiny_presets(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path), "--tiny", "--lr", "0.01", "--device", "cpu"])
    cfg = config_from_args(args)
    assert cfg.tiny and cfg.hidden == 64 and cfg.lr == 0.01 and cfg.device == "cpu" and cfg.workers == 0
    args = build_parser().parse_args(["--out", str(tmp_path), "--device", "cpu"])
    cfg = config_from_args(args)
    assert cfg.hidden == 512 and cfg.minutes == 9.0


def test_tiny_training_end_to_end(tmp_path):
    out = tmp_path / "ckpt"
    rc = main(["--out", str(out), "--tiny", "--steps", "4", "--device", "cpu", "--corpus-root", str(EMAIL_ROOT),
               "--save-dtype", "float32", "--selfcheck-samples", "2", "--log-every", "1"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "metrics.json",
            "train_log.txt"} <= names
    shards = list(out.glob("*.safetensors"))
    assert shards and all(p.stat().st_size <= MIB15 for p in shards)
    m = json.loads((out / "metrics.json").read_text())
    tr = m["training"]
    assert tr["steps"] == 4 and tr["tokens_seen"] == 4 * 2048
    assert [p["seq_len"] for p in tr["phases"]] == [256, 512] and [p["steps"] for p in tr["phases"]] == [2, 2]
    assert math.isfinite(tr["final_lm_loss"]) and 0 < tr["final_lm_loss"] < 10
    assert m["selfcheck"]["reload"] == {"weights_max_abs_diff": 0.0, "logits_max_abs_diff_vs_live": 0.0}
    assert set(m["selfcheck"]["passkey"]) == {"512"} and m["selfcheck"]["passkey"]["512"]["n"] == 2
    assert m["recipe"]["model"]["n_params"] > 0 and m["environment"]["torch"] == torch.__version__
    card = (out / "README.md").read_text()
    assert "Not evaluated yet" in card and "Recipe" in card
    # offline reload: identical logits from two independent loads, tokenizer from the same folder
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = tok("def f(x):\n    return 1234567\n", return_tensors="pt")["input_ids"]
    a = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    b = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert la.shape[-1] == a.config.vocab_size and torch.equal(la, lb) and torch.isfinite(la).all()


def test_tiny_wall_clock_schedule(tmp_path):
    """Without --steps the curriculum follows the clock: both phases run, the run ends in budget."""
    import time
    out = tmp_path / "clock"
    t0 = time.monotonic()
    rc = main(["--out", str(out), "--tiny", "--minutes", "0.4", "--reserve-seconds", "4", "--device", "cpu",
               "--corpus-root", str(EMAIL_ROOT), "--selfcheck-lengths", "", "--no-mid-checkpoints",
               "--log-every", "5"])
    wall = time.monotonic() - t0
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    ph = m["training"]["phases"]
    assert [p["seq_len"] for p in ph] == [256, 512] and all(p["steps"] >= 1 for p in ph)
    assert m["training"]["train_seconds"] <= 24 and wall <= 24 + 20  # budget + save/reload slack
    assert 0.4 <= ph[0]["seconds"] / ph[1]["seconds"] <= 2.5  # 50/50 time split
    assert "passkey" not in m["selfcheck"] and m["training"]["stopped_early"] is False
