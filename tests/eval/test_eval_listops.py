"""Tests of sparsattn.eval.listops (LRA ListOps generator, tokenizer, evaluator)."""
from __future__ import annotations

import random

import pytest
import torch

from sparsattn.eval import listops as LO


@pytest.mark.parametrize("expr,value", [
    ("[MAX 2 9 ]", 9),
    ("[MIN 4 7 1 ]", 1),
    ("[MED 1 2 3 ]", 2),
    ("[MED 1 2 ]", 1),           # (1 + 2) // 2, LRA's int(np.median)
    ("[MED 9 2 8 3 ]", 5),       # median 5.5 -> 5
    ("[SM 7 8 9 ]", 4),          # 24 mod 10
    ("[MAX 2 [MIN 4 7 ] 0 ]", 4),
    ("[SM [MAX 9 1 ] [MED 3 5 7 ] 2 ]", 6),
    ("( ( ( [MAX 2 ) 9 ) ] )", 9),  # LRA's printed form with parentheses
    ("7", 7),
])
def test_evaluate(expr, value):
    assert LO.evaluate(expr) == value
    assert LO.evaluate(expr.split()) == value


@pytest.mark.parametrize("bad", ["[MAX 2 9", "[MAX ]", "2 3", "]", "[FOO 1 ]", "[MAX 12 ]"])
def test_evaluate_errors(bad):
    with pytest.raises(ValueError):
        LO.evaluate(bad)


def test_tree_tokens_and_evaluation_agree():
    rng = random.Random(0)
    for _ in range(200):
        tree, length = LO.generate_tree(rng, max_depth=6, max_args=5)
        toks = LO.tree_tokens(tree)
        assert len(toks) == length
        assert LO.evaluate(toks) == LO.evaluate_tree(tree)


def test_generate_tree_shape():
    rng = random.Random(1)
    n_ops = n_leaves = 0

    def depth(t):
        if isinstance(t, int):
            return 1
        assert 2 <= len(t[1]) <= 4
        return 1 + max(depth(c) for c in t[1])

    for _ in range(500):
        tree, _ = LO.generate_tree(rng, max_depth=5, max_args=4)
        assert depth(tree) <= 5
        stack = [tree]
        while stack:
            t = stack.pop()
            if isinstance(t, int):
                n_leaves += 1
            else:
                n_ops += 1
                stack.extend(t[1])
    assert n_ops > 0 and n_leaves > n_ops


def test_dataset():
    x, y = LO.listops_dataset(40, min_len=60, max_len=300, seed=0)
    assert x.shape == (40, 300) and y.shape == (40,) and x.dtype == y.dtype == torch.long
    lengths = (x != LO.PAD_ID).sum(-1)
    assert bool(((lengths >= 60) & (lengths <= 300)).all())
    for row, lab, n in zip(x, y, lengths):
        assert bool((row[n:] == LO.PAD_ID).all()) and bool((row[:n] != LO.PAD_ID).all())
        assert LO.evaluate(LO.decode(row)) == int(lab)
    assert len({tuple(r.tolist()) for r in x}) == 40  # distinct
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    x2, y2 = LO.listops_dataset(40, min_len=60, max_len=300, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = LO.listops_dataset(40, min_len=60, max_len=300, seed=1)
    assert not torch.equal(x, x3)


def test_dataset_lra_range_fast_enough():
    x, y = LO.listops_dataset(20, seed=3)  # LRA defaults: 500..2000 tokens
    lengths = (x != LO.PAD_ID).sum(-1)
    assert x.shape == (20, 2000) and bool(((lengths >= 500) & (lengths <= 2000)).all())


def test_encode_decode():
    text = "[MAX 2 [MIN 4 7 ] 0 ]"
    ids = LO.encode(text)
    assert LO.decode(ids) == text
    assert LO.encode("( ( [MAX 2 ) 9 ) ]") == LO.encode("[MAX 2 9 ]")
    assert len(LO.VOCAB) == len(set(LO.VOCAB)) and LO.VOCAB[LO.PAD_ID] == LO.PAD
    with pytest.raises(ValueError, match="unknown token"):
        LO.encode("[MAX 2 x ]")


def test_dataset_errors():
    with pytest.raises(ValueError, match="min_len"):
        LO.listops_dataset(2, min_len=100, max_len=50, seed=0)
    with pytest.raises(ValueError, match="pad_to"):
        LO.listops_dataset(2, min_len=10, max_len=50, pad_to=40, seed=0)
