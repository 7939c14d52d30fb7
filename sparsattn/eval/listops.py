"""LRA ListOps, generated locally (Tay et al., Long Range Arena, arXiv 2011.04006; Nangia & Bowman, arXiv 1804.06028).

Expressions over ``[MIN``, ``[MAX``, ``[MED`` (median, rounded down), ``[SM`` (sum mod 10) and the
digits 0-9, each operator closed by ``]``. As in LRA's generator: a node is a leaf (a uniform
digit) with probability 0.75, otherwise a uniform operator with a uniform 2..``max_args``
arguments; nodes at ``max_depth`` (root = depth 1) are leaves; the length is counted as 1 per
digit and 2 per operator (its token and its ``]``), which is exactly the number of tokens here
(LRA's parentheses, artefacts of its tuple printing, are not tokens). Expressions are rejection
sampled until their length is in [min_len, max_len], duplicates dropped. 10-way classification
of the value.
"""
from __future__ import annotations

import random
from typing import Union

import torch

OPERATORS: tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
PAD = "<pad>"
#: fixed vocabulary: pad, digits 0-9, the operators, the closing bracket, LRA's parentheses
VOCAB: tuple[str, ...] = (PAD,) + tuple(str(d) for d in range(10)) + OPERATORS + (END, "(", ")")
TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(VOCAB)}
PAD_ID = 0
LEAF_PROB = 0.75

# a tree is a digit (int) or (operator, [children])
Tree = Union[int, tuple]


def _apply(op: str, args: list[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        s = sorted(args)
        m = len(s) // 2
        return s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2  # LRA: int(np.median(...))
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"op: unknown operator {op!r}; expected one of {OPERATORS}")


def evaluate_tree(tree: Tree) -> int:
    """evaluate_tree: the value (0-9) of a ListOps tree ``digit | (operator, [children])``."""
    if isinstance(tree, int):
        if not 0 <= tree <= 9:
            raise ValueError(f"tree: digit out of range 0..9: {tree}")
        return tree
    op, children = tree
    if not children:
        raise ValueError(f"tree: operator {op} without arguments")
    return _apply(op, [evaluate_tree(c) for c in children])


def tree_tokens(tree: Tree) -> list[str]:
    """tree_tokens: the token strings of a tree, e.g. ``['[MAX', '2', '9', ']']``."""
    out: list[str] = []
    stack: list = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, int):
            out.append(str(node))
        else:
            op, children = node
            out.append(op)
            stack.append(END)
            stack.extend(reversed(children))
    return out


def evaluate(expression: str | list[str]) -> int:
    """evaluate: the value of a ListOps expression given as text or tokens.

    Text is split on whitespace; parentheses (LRA's printed form) are ignored, so both
    ``"[MAX 2 9 [MIN 4 7 ] 0 ]"`` and ``"( ( [MAX 2 ) 9 ) ]"``-style strings work.
    Raises:
        ValueError: unknown token, unbalanced brackets, an operator without arguments, or not
            exactly one top-level value.
    """
    tokens = expression.split() if isinstance(expression, str) else list(expression)
    stack: list[tuple[str, list[int]]] = []
    result: list[int] = []
    for tok in tokens:
        if tok in ("(", ")"):
            continue
        if tok in OPERATORS:
            stack.append((tok, []))
        elif tok == END:
            if not stack:
                raise ValueError("expression: ']' without an open operator")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"expression: operator {op} without arguments")
            val = _apply(op, args)
            (stack[-1][1] if stack else result).append(val)
        elif tok.isdigit() and len(tok) == 1:
            (stack[-1][1] if stack else result).append(int(tok))
        else:
            raise ValueError(f"expression: unknown token {tok!r}; expected digits, {OPERATORS} or ']'")
    if stack:
        raise ValueError(f"expression: {len(stack)} operator(s) not closed")
    if len(result) != 1:
        raise ValueError(f"expression: expected one top-level value, got {len(result)}")
    return result[0]


def encode(tokens: str | list[str]) -> list[int]:
    """encode: token ids (``VOCAB`` indices) of a ListOps expression; parentheses are dropped."""
    toks = tokens.split() if isinstance(tokens, str) else tokens
    ids = []
    for t in toks:
        if t in ("(", ")"):
            continue
        if t not in TOKEN_TO_ID or t == PAD:
            raise ValueError(f"tokens: unknown token {t!r}; vocabulary is {VOCAB[1:]}")
        ids.append(TOKEN_TO_ID[t])
    return ids


def decode(ids: list[int] | torch.Tensor) -> str:
    """decode: the expression text of token ids (padding dropped)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return " ".join(VOCAB[i] for i in ids if i != PAD_ID)


class _TooLong(Exception):
    pass


def generate_tree(rng: random.Random, *, max_depth: int = 10, max_args: int = 10,
                  max_len: int | None = None) -> tuple[Tree, int]:
    """generate_tree: one random ListOps tree and its length, LRA's recursive process (arXiv 2011.04006).

    A node at depth < ``max_depth`` is an operator with probability 1 - 0.75, with
    ``rng.randint(2, max_args)`` children. With ``max_len``, generation stops early and raises
    ``OverflowError`` once the length exceeds it (the tree would be rejected anyway).
    """
    budget = [0]

    def gen(depth: int) -> Tree:
        if depth < max_depth and rng.random() > LEAF_PROB:
            budget[0] += 2
            if max_len is not None and budget[0] > max_len:
                raise _TooLong
            n_args = rng.randint(2, max_args)
            children = [gen(depth + 1) for _ in range(n_args)]
            return (rng.choice(OPERATORS), children)
        budget[0] += 1
        if max_len is not None and budget[0] > max_len:
            raise _TooLong
        return rng.randrange(10)

    try:
        tree = gen(1)
    except _TooLong:
        raise OverflowError("tree longer than max_len") from None
    return tree, budget[0]


def listops_dataset(n: int, *, min_len: int = 500, max_len: int = 2000, seed: int, max_depth: int = 10,
                    max_args: int = 10, pad_to: int | None = None,
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """listops_dataset: n distinct ListOps expressions as padded token ids and their values (LRA, arXiv 2011.04006).

    Args:
        n: number of examples (LRA: 96k / 2k / 2k; draw one set and split it, or use different seeds).
        min_len, max_len: accepted length range in tokens, inclusive (LRA: 500-2000).
        seed: seeds a ``random.Random``.
        max_depth, max_args: tree shape limits (LRA: 10, 10).
        pad_to: padded width (default ``max_len``); must be >= max_len.
        progress: show a tqdm bar.
    Returns:
        ``(inputs, labels)``: LongTensor [n, pad_to] of ``VOCAB`` ids, right-padded with 0, and
        LongTensor [n] of values 0..9.
    Raises:
        ValueError: bad sizes (e.g. min_len > max_len, max_len < 5, pad_to < max_len).
    """
    for name, v in (("n", n), ("min_len", min_len), ("max_len", max_len), ("max_depth", max_depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if isinstance(max_args, bool) or not isinstance(max_args, int) or max_args < 2:
        raise ValueError(f"max_args: expected an int >= 2, got {max_args!r}")
    if min_len > max_len:
        raise ValueError(f"min_len: expected <= max_len={max_len}, got {min_len}")
    if max_len < 5 or max_depth < 2:
        raise ValueError(f"max_len, max_depth: need >= 5 tokens and depth >= 2 for an operator, "
                         f"got {max_len}, {max_depth}")
    pad_to = max_len if pad_to is None else pad_to
    if pad_to < max_len:
        raise ValueError(f"pad_to: expected >= max_len={max_len}, got {pad_to}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")

    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    inputs = torch.full((n, pad_to), PAD_ID, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="listops", leave=False)
    count = 0
    attempts = 0
    while count < n:
        attempts += 1
        if attempts > 1000 * n + 100_000:
            raise ValueError(f"min_len, max_len: could not draw {n} distinct trees with length in "
                             f"[{min_len}, {max_len}] after {attempts} attempts")
        try:
            tree, length = generate_tree(rng, max_depth=max_depth, max_args=max_args, max_len=max_len)
        except OverflowError:
            continue
        if length < min_len:
            continue
        ids = tuple(TOKEN_TO_ID[t] for t in tree_tokens(tree))
        if ids in seen:
            continue
        seen.add(ids)
        inputs[count, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[count] = evaluate_tree(tree)
        count += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return inputs, labels
