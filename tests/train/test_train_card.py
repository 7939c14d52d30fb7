import json

import pytest

from sparsattn.train.card import main, render_card, write_card

METRICS = {
    "recipe": {"model": {"n_params": 24_388_096, "hidden_size": 512}, "lr": 0.0015, "curriculum": "1024:0.5"},
    "training": {"steps": 4000, "tokens_seen": 500_000_000, "train_seconds": 470.2, "final_lm_loss": 1.23,
                 "phases": [{"seq_len": 1024, "steps": 10, "tokens": 10240, "seconds": 1.0, "tokens_per_s": 10240,
                             "lm_loss": 2.0, "answer_loss": 0.5}]},
    "environment": {"gpu": "NVIDIA H200", "torch": "2.11.0", "transformers": "5.17.0", "date": "2026-11-29"},
    "selfcheck": {"passkey": {"2048": {"acc": 1.0, "n": 2, "by_depth": {"0.00": 1.0, "1.00": 1.0}}}},
    "eval": {},
}


def test_render_without_and_with_eval():
    card = render_card(METRICS)
    assert "24,388,096" in card and "Not evaluated yet" in card and "NVIDIA H200" in card
    assert "| 1024 | 10 |" in card and "0.0015" in card
    ev = dict(METRICS, eval={"perplexity": {"16384": 3.5, "2048": 4.25},
                             "passkey": {"2048": {"0.0": 1.0, "0.5": 0.9}, "16384": {"0.0": 0.95, "0.5": 1.0}},
                             "notes": "dense"})
    card = render_card(ev)
    assert "Not evaluated yet" not in card
    assert card.index("| 2048 | 4.25 |") < card.index("| 16384 | 3.5 |")
    assert "| 2048 | 100% | 90% | 95.0% |" in card and "notes: dense" in card
    with pytest.raises(ValueError, match="metrics"):
        render_card([1, 2])


def test_write_card_merges_eval(tmp_path):
    write_card(tmp_path, json.loads(json.dumps(METRICS)))
    (tmp_path / "eval.json").write_text(json.dumps({"perplexity": {"2048": 5.0}}))
    assert main([str(tmp_path), "--eval", str(tmp_path / "eval.json")]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["eval"]["perplexity"] == {"2048": 5.0} and m["training"]["steps"] == 4000
    assert "| 2048 | 5 |" in (tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="folder"):
        write_card(tmp_path / "missing")
