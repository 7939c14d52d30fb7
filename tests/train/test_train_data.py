import random
import re

import numpy as np
import pytest
import torch

from sparsattn.eval import tasks as eval_tasks
from sparsattn.train.data import (GROUP_ANSWER, GROUP_IGNORE, GROUP_LM, BatchMaker, BatchStream, Corpus,
                                  raw_tokenizer)


def _rngs(seed):
    return random.Random(seed), np.random.default_rng(seed)


def _check_prompt(tok, s):
    """The prompt's ids equal the tokenization of its text (BOS included) and end where answer 1 starts."""
    want = tok(s.prompt)["input_ids"]
    got = s.ids[s.prompt_start:s.prompt_end].tolist()
    assert got == want
    ans = tok.decode(s.ids[s.prompt_end:].tolist())
    assert ans.lstrip(' "').startswith(s.answers[0])


CASES = [
    ("needle", dict(haystack="noise", n_needles=1)),
    ("needle", dict(haystack="code", n_needles=1)),
    ("needle", dict(haystack="noise", n_needles=4, n_questions=3, key_kind="uuid", value_kind="uuid")),
    ("needle", dict(haystack="code", n_needles=3, n_questions=2, key_kind="number")),
    ("needle", dict(haystack="needle", n_questions=2)),
    ("variable_tracking", dict(num_chains=2, num_hops=3)),
    ("variable_tracking", dict(haystack="code", num_chains=1, num_hops=2)),
    ("kv", dict(n_questions=2, key_kind="words")),
    ("kv", dict(key_kind="uuid", value_kind="uuid")),
]


@pytest.mark.parametrize("length", [700, 3000])
@pytest.mark.parametrize("task,kw", CASES)
def test_tokens_equal_whole_prompt_encoding(tokenizer, tasks, task, kw, length):
    for seed in range(3):
        s = getattr(tasks, task)(*_rngs(seed), length, **kw)
        assert s.ids.shape == (length,) and s.groups.shape == (length,) and s.ids.dtype == np.int32
        assert s.ids[s.prompt_start] == tokenizer.bos_token_id
        _check_prompt(tokenizer, s)
        # every answer is trained on (group 2) and nothing else is an answer
        assert tokenizer.decode(s.ids[s.groups == GROUP_ANSWER].tolist()).split() == \
            " ".join(f'"{a}"' if task == "kv" else a for a in s.answers).split()


def test_passkey_answer_follows_question(tokenizer, tasks):
    s = tasks.needle(*_rngs(1), 2048, haystack="noise", n_needles=1, depths=[0.3])
    key, value = s.meta["keys"][0], s.meta["values"][0]
    assert s.answers == [value] and re.fullmatch(r"[1-9]\d{6}", value)
    assert s.prompt.endswith("\n" + eval_tasks.QUESTION_TEMPLATE.format(key=key))
    assert s.prompt.count(eval_tasks.NEEDLE_TEMPLATE.format(key=key, value=value)) == 1
    answer = s.ids[s.prompt_end:s.prompt_end + 8].tolist()
    assert tokenizer.decode(answer) == " " + value
    assert (s.groups[s.prompt_end:s.prompt_end + 8] == GROUP_ANSWER).all()
    assert s.prompt_end + 8 == len(s.ids)  # nothing after the answer: the sample ends there


@pytest.mark.parametrize("haystack", ["noise", "code"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_needle_at_stated_depth(tasks, haystack, depth):
    s = tasks.needle(*_rngs(7), 4096, haystack=haystack, n_needles=1, depths=[depth])
    n = s.meta["n_units"]
    assert n > 50 and s.meta["gaps"] == [int(round(depth * n))]
    c0, c1 = s.meta["context_span"]
    start, end = s.meta["spans"][("needle", 0)]
    frac = (start - c0) / max(1, (c1 - c0) - (end - start))
    tol = 0.02 if haystack == "noise" else 0.06  # one sentence vs. one (long) line of code
    assert abs(frac - depth) <= tol
    if haystack == "code":
        assert (s.groups[c0:start] == GROUP_LM).all()  # code haystack is language-modelled
    else:
        assert (s.groups[c0:start] == GROUP_IGNORE).all()


def _shape(prompt, needle, key):
    """Prompt with noise sentences -> S, the needle -> N, the key -> K."""
    x = prompt.replace(needle, "N").replace(key, "K")
    for sent in eval_tasks.NOISE_SENTENCES:
        x = x.replace(sent, "S")
    return x


def test_same_layout_as_evaluation_passkey(tokenizer, tasks):
    ev = eval_tasks.passkey(tokenizer, 1500, 0.4, seed=3)
    s = tasks.needle(*_rngs(3), 1500, haystack="noise", n_needles=1, depths=[0.4])
    pat = re.compile(re.escape(eval_tasks.PREAMBLE) + r"\n(S )*N( S)*\n" +
                     re.escape(eval_tasks.QUESTION_TEMPLATE.format(key="K")))
    assert pat.fullmatch(_shape(ev.prompt, ev.meta["needle"], ev.meta["key"]))
    k, v = s.meta["keys"][0], s.meta["values"][0]
    assert pat.fullmatch(_shape(s.prompt, eval_tasks.NEEDLE_TEMPLATE.format(key=k, value=v), k))


def test_same_layout_as_evaluation_vt(tokenizer, tasks):
    s = tasks.variable_tracking(*_rngs(4), 1500, num_chains=1, num_hops=4)
    ev = eval_tasks.variable_tracking(tokenizer, 1500, seed=4)

    def shape(p, value):
        x = re.sub(r"VAR [A-Z]{5} = (VAR [A-Z]{5}|\d{5})", "V", p).replace(value, "X")
        for sent in eval_tasks.NOISE_SENTENCES:
            x = x.replace(sent, "S")
        return re.sub(r"(S |V )+", "U ", x)
    assert shape(s.prompt, s.meta["values"][0]) == shape(ev.prompt, ev.meta["value"])


def test_pad_front_exact_length_and_filler(tasks, tokenizer):
    s = tasks.needle(*_rngs(2), 3001, haystack="noise")
    assert len(s.ids) == 3001
    if s.prompt_start > 0:
        assert s.ids[s.prompt_start - 1] == tokenizer.eos_token_id
        assert (s.groups[:s.prompt_start - 1] == GROUP_LM).all()
    short = tasks.needle(*_rngs(2), 3001, haystack="noise", pad_front=False)
    assert short.prompt_start == 0 and len(short.ids) <= 3001


def test_errors(tasks):
    with pytest.raises(ValueError, match="haystack"):
        tasks.needle(*_rngs(0), 1000, haystack="essay")
    with pytest.raises(ValueError, match="depths"):
        tasks.needle(*_rngs(0), 1000, n_needles=2, depths=[0.5])
    with pytest.raises(ValueError, match="length"):
        tasks.needle(*_rngs(0), 40)
    with pytest.raises(ValueError, match="value_kind"):
        tasks.needle(*_rngs(0), 1000, value_kind="date")
    with pytest.raises(ValueError, match="mix"):
        type(tasks)(tasks.raw, tasks.corpus, bos_id=1, eos_id=2, mix={"cwe": 1.0})


def test_mixture_covers_tasks_and_lengths(tasks):
    seen = set()
    rng, nprng = _rngs(11)
    for L in (257, 1025, 4097):
        for _ in range(40):
            s = tasks.sample(rng, nprng, L)
            assert len(s.ids) == L and (s.groups == GROUP_ANSWER).any()
            seen.add((s.meta["task"], s.meta.get("haystack")))
    assert {"needle", "variable_tracking", "kv"} <= {t for t, _ in seen}
    assert {"noise", "code", "needle"} <= {h for _, h in seen}


def test_batches_deterministic_and_mixed(corpus, tasks, tokenizer):
    mk = lambda: BatchMaker(corpus, tasks, seq_len=512, batch_size=10, retrieval_share=0.3, seed=5,  # noqa: E731
                            bos_id=tokenizer.bos_token_id)
    a, b = mk().batch(3), mk().batch(3)
    assert a["tokens"].shape == (10, 513) and a["groups"].dtype == np.uint8
    assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["groups"], b["groups"])
    assert not np.array_equal(a["tokens"], mk().batch(4)["tokens"])
    syn = (a["groups"] == GROUP_ANSWER).any(axis=1)
    assert syn.sum() == 3
    corpus_rows = a["groups"][~syn]
    assert set(np.unique(corpus_rows[:, 1:])) <= {GROUP_LM, GROUP_IGNORE}
    assert (a["groups"][:, 0] == GROUP_IGNORE).all()
    assert ((a["tokens"][~syn] == tokenizer.bos_token_id) == (corpus_rows == GROUP_IGNORE))[:, 1:].all()


def test_stream_with_workers_keeps_order(corpus, tokenizer):
    import multiprocessing as mp
    raw = raw_tokenizer(tokenizer)
    ds = BatchStream(corpus, raw.to_str(), seq_len=256, batch_size=4, retrieval_share=0.5, seed=9,
                     bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    maker = ds.maker()
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=mp.get_context("fork"))
    it = iter(dl)
    for i in range(4):
        b = next(it)
        ref = maker.batch(i)
        assert torch.equal(b["tokens"], torch.from_numpy(ref["tokens"]))
        assert torch.equal(b["groups"], torch.from_numpy(ref["groups"]))
    del it


def test_corpus_packing(corpus, tokenizer):
    t = corpus.tokens
    assert t[0] == tokenizer.bos_token_id and t[-1] == tokenizer.eos_token_id
    assert (t == tokenizer.bos_token_id).sum() == (t == tokenizer.eos_token_id).sum() == corpus.n_docs
    w = corpus.window(np.random.default_rng(0), 100)
    assert w.dtype == np.int32 and w.shape == (100,)
    with pytest.raises(ValueError, match="n"):
        corpus.window(np.random.default_rng(0), len(corpus) + 1)
    with pytest.raises(ValueError, match="paths"):
        Corpus.build(raw_tokenizer(tokenizer), [], bos_id=1, eos_id=2)
