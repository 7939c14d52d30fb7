"""Offline long-context retrieval tasks in the style of RULER (Hsieh et al., arXiv 2404.06654).

Every generator is seeded and deterministic, needs nothing but a tokenizer, and builds a prompt
whose token length is close to, and never above, a target ``length`` (counted with the
tokenizer's default special tokens, i.e. what the model will see).

Prompt layout of the needle tasks (``passkey``, ``multikey_needle``)::

    PREAMBLE + "\\n" + context + "\\n" + QUESTION_TEMPLATE.format(key=key)

where the context is the haystack with ``NEEDLE_TEMPLATE.format(key=key, value=value)`` inserted
at a sentence (noise haystack) or line (code haystack) boundary. The model should continue with
the value. The strings are module constants because the bundled model is trained on exactly
this format.

Length fitting: a prompt is a function of a number of haystack units (sentences, lines, words);
the generator estimates tokens per unit from a small sample, then tokenizes a handful of
candidate prompts, with secant steps and bisection, and keeps the longest one that fits.

Modules: ``_base`` (exact strings, ``Sample``, tokenizer helpers, haystacks, length fitting),
``needle`` (passkey, multi-key), ``tracking`` (variable tracking), ``aggregation`` (common and
frequent words); the registry is here.
"""
from __future__ import annotations

from typing import Any, Callable

from .. import _words  # noqa: F401  (tasks._words)
from ._base import (NOISE_SENTENCES, NEEDLE_TEMPLATE, QUESTION_TEMPLATE, PREAMBLE, NEEDLE_TEMPLATE_UUID,
                    QUESTION_TEMPLATE_UUID, PREAMBLE_UUID, VT_PREAMBLE, VT_QUESTION_TEMPLATE, CWE_PREAMBLE,
                    CWE_QUESTION_TEMPLATE, FWE_PREAMBLE, FWE_QUESTION_TEMPLATE, _NUMBER_WORDS, Sample,
                    _encode_kwargs, encode_ids, count_tokens, _check_common, _check_depth, _rng, _derive_seed,
                    _random_number, _random_key, _random_value, _heldout_files, _Haystack, _gap_index,
                    _assemble, _Fit, _fit_units, _estimate_tpu)  # noqa: F401
from .aggregation import common_words, frequent_words
from .needle import multikey_needle, passkey
from .tracking import variable_tracking

# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    "multikey_needle": multikey_needle,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}

#: tasks whose generator takes a needle ``depth``
DEPTH_TASKS = frozenset({"passkey", "multikey_needle"})


def get_task(name: str) -> Callable[..., Sample]:
    """get_task: the generator registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"task: unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}") from None


def make_samples(task: str, tokenizer: Any, length: int, n: int, *, seed: int, progress: bool = True,
                 **kw: Any) -> list[Sample]:
    """make_samples: ``n`` samples of a task, sample i seeded from (seed, i).

    For needle tasks, ``depth=`` in ``kw`` fixes the depth; otherwise depths sweep evenly over
    [0, 1] across the n samples (``linspace(0, 1, n)``, 0.5 when n == 1). Other keyword arguments
    go to the generator.
    Raises:
        ValueError: unknown task, ``n`` < 1, or a bad generator argument.
    """
    gen = get_task(task)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    _check_common(length, seed)
    if task not in DEPTH_TASKS and "depth" in kw:
        raise ValueError(f"depth: task {task!r} takes no depth")
    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"{task}@{length}", leave=False)
    out = []
    for i in iterator:
        args = dict(kw)
        if task in DEPTH_TASKS:
            depth = args.pop("depth", None)
            if depth is None:
                depth = i / (n - 1) if n > 1 else 0.5
            out.append(gen(tokenizer, length, depth, seed=_derive_seed(seed, i), **args))
        else:
            out.append(gen(tokenizer, length, seed=_derive_seed(seed, i), **args))
    return out
