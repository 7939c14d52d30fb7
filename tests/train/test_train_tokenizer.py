import pytest

from sparsattn.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer, wrap_tokenizer

TEXTS = [
    "def f(x):\n\treturn x + 1  # café ünïcode ✓\n",
    "class A:\n    \"\"\"Doc 2026.\"\"\"\n\n    value = 1234567\n",
    "The grass is green. The sky is blue. One of the special magic numbers for agile-goose is: 7654321.",
]


def test_round_trip_and_bos(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_digits_are_single_tokens(tokenizer):
    toks = tokenizer.convert_ids_to_tokens(tokenizer(" 1234567.", add_special_tokens=False)["input_ids"])
    assert toks == ["Ġ", "1", "2", "3", "4", "5", "6", "7", "."]
    # the answer continues the prompt's tokenization (no merge across "is" + " 7...")
    prompt = "The special magic number for x mentioned in the provided text is"
    full = tokenizer(prompt + " 7654321", add_special_tokens=False)["input_ids"]
    assert full[:len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] == \
        tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_save_load_offline(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for text in TEXTS:
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<s>", "</s>", "<pad>")
    assert again.convert_tokens_to_ids(["<pad>", "<s>", "</s>"]) == [0, 1, 2]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="path"):
        load_tokenizer(tmp_path)
    from tokenizers import Tokenizer, models
    with pytest.raises(ValueError, match="special token"):
        wrap_tokenizer(Tokenizer(models.BPE()))


def test_vocab_size_honoured():
    tok = train_tokenizer(TEXTS * 50, vocab_size=600)
    assert len(tok) <= 600
