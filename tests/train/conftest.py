"""Fixtures of the training-recipe tests: a small tokenizer and corpus from one stdlib package."""
import email
from pathlib import Path

import pytest
import torch

EMAIL_ROOT = Path(email.__file__).resolve().parent


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # a busy 2-core machine makes multi-threaded CPU kernels many times slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def train_files():
    from sparsattn.data import source_files
    return source_files("train", roots=[EMAIL_ROOT])


@pytest.fixture(scope="session")
def tokenizer(train_files, tmp_path_factory):
    from sparsattn.train.tokenizer import load_tokenizer, sample_texts, save_tokenizer, train_tokenizer
    tok = train_tokenizer(sample_texts(train_files, 400_000), vocab_size=1024)
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, path)
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def corpus(tokenizer, train_files):
    from sparsattn.train.data import Corpus, raw_tokenizer
    return Corpus.build(raw_tokenizer(tokenizer), train_files, bos_id=tokenizer.bos_token_id,
                        eos_id=tokenizer.eos_token_id)


@pytest.fixture(scope="session")
def tasks(tokenizer, corpus):
    from sparsattn.train.data import RetrievalTasks, raw_tokenizer
    return RetrievalTasks(raw_tokenizer(tokenizer), corpus, bos_id=tokenizer.bos_token_id,
                          eos_id=tokenizer.eos_token_id, with_text=True)
