"""calibrate._retrieval: retrieval-style calibration prompts shared by the calibrations that must find
the heads that retrieve (MInference's search runs on a retrieval example, arXiv 2407.02490; MoA
profiles long-range dependent data, arXiv 2406.14909; retrieval heads, arXiv 2404.15574).

A prompt is a RULER niah_single passkey (arXiv 2404.06654: preamble, a 7-digit value in the needle
sentence at a depth, the question) whose haystack is a window of tokenized source files of the
*training* split (``sparsattn.data.source_files("train")``), so no calibration prompt shares a
haystack with the evaluation (``sparsattn.eval.retrieval_check --haystack code``: held-out files, seed 2112); keys, values
and depths come from the calibration seed. The pieces are spliced as token ids, so every prompt has
exactly ``length`` tokens (prompt + answer) and prompts batch.
"""
from __future__ import annotations

import random

import torch

Tensor = torch.Tensor

__all__ = ["retrieval_prompts", "prose_windows", "eval_prose_files", "calibration_prose_files"]


def retrieval_prompts(tokenizer, length: int, n: int, *, seed: int = 0, depths=None, haystack=None) -> list[dict]:
    """retrieval_prompts: ``n`` passkey prompts of exactly ``length`` tokens (prompt + answer) over a
    training-split source haystack.

    Returns ``[{"ids": long [1, length], "prompt_len": P, "needle": [value token positions],
    "answer": [answer positions P..length-1], "depth": float}]``; the answer is ``" " + value``
    (teacher forcing: rows ``P-1 .. length-2`` predict it). ``depths`` default ``linspace(0, 1, n)``;
    ``haystack``: an iterator of ``[1, >= length]`` token windows (default: ``token_windows`` over the
    training split, seed ``10000 + seed``).
    Raises:
        ValueError: ``length`` too short for the template (< 256 tokens) or ``n`` < 1.
    """
    from ..eval.tasks import encode_ids
    from ..eval.tasks._base import NEEDLE_TEMPLATE, PREAMBLE, QUESTION_TEMPLATE, _random_key, _random_number
    from ..train.seer_gate import token_windows

    if isinstance(length, bool) or not isinstance(length, int) or length < 256:
        raise ValueError(f"length: expected an int >= 256, got {length!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    depths = [i / max(1, n - 1) for i in range(n)] if depths is None else [float(d) for d in depths]
    rng = random.Random(f"calibration-retrieval-{seed}")
    windows = token_windows(tokenizer, length, seed=10_000 + seed, split="train") if haystack is None else haystack
    enc = lambda s: encode_ids(tokenizer, s, add_special_tokens=False)  # noqa: E731
    out = []
    for i in range(n):
        key, value = _random_key(rng, "words"), _random_number(rng, 7)
        head = encode_ids(tokenizer, PREAMBLE + "\n")
        needle = enc("\n" + NEEDLE_TEMPLATE.format(key=key, value=value) + "\n")
        question = enc("\n" + QUESTION_TEMPLATE.format(key=key))
        answer = enc(" " + value)
        hay_len = length - len(head) - len(needle) - len(question) - len(answer)
        hay = next(windows)[0, :hay_len].tolist()
        cut = int(round(depths[i % len(depths)] * hay_len))
        prompt = head + hay[:cut] + needle + hay[cut:] + question
        digits = [t for t in answer if tokenizer.decode([t]).strip()]
        s = len(head) + cut
        pos = [j for j in range(s, s + len(needle) - len(digits) + 1) if needle[j - s:j - s + len(digits)] == digits]
        if not pos:
            raise ValueError("tokenizer: the value's tokens inside the needle differ from the answer's tokens")
        P = len(prompt)
        out.append({"ids": torch.tensor([prompt + answer], dtype=torch.long), "prompt_len": P,
                    "needle": list(range(pos[0], pos[0] + len(digits))), "answer": list(range(P, P + len(answer))),
                    "depth": depths[i % len(depths)]})
    return out


def eval_prose_files(seed: int, lines: int) -> list:
    """eval_prose_files: the documentation files whose prose the held-out check's haystack stream (seed
    ``seed``, ``eval.tasks`` prose haystack) reads for its first ``lines`` lines: every file a check
    prompt of up to about ``lines`` prose lines can touch (all of them when the corpus is smaller)."""
    from ..eval.tasks._base import _Haystack

    h = _Haystack("prose", seed)
    try:
        h.units(lines)
    except ValueError:  # the corpus has fewer lines: the stream read every file
        pass
    return h.files_read()


def calibration_prose_files(exclude_seed: int = 2112, exclude_lines: int = 4000) -> list:
    """calibration_prose_files: the documentation files (``sparsattn.data.prose_files``) left for
    calibration once ``eval_prose_files(exclude_seed, exclude_lines)`` are taken out."""
    from ..data import prose_files

    skip = set(eval_prose_files(exclude_seed, exclude_lines))
    return [f for f in prose_files() if f not in skip]


def prose_windows(tokenizer, length: int, *, seed: int = 0, exclude_seed: int = 2112, exclude_lines: int = 4000):
    """prose_windows: endless ``[1, length]`` token windows of prose lines (``sparsattn.data.prose``) for
    calibration haystacks, from the documentation files the held-out check never reads: the files
    holding the first ``exclude_lines`` lines of the check's stream (seed ``exclude_seed``, issue 21's
    2112; 4000 lines are about 70K tokens, far past the check's 8K) are left out, so no calibration
    haystack shares a file with a check prompt. Lines are joined by spaces as the check joins them;
    files are shuffled by ``seed`` and repeated when the stream runs out.

    Raises:
        ValueError: ``length`` < 1, or no prose line is left after the exclusion.
    """
    from ..data import prose_lines

    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected a positive int, got {length!r}")
    files = calibration_prose_files(exclude_seed, exclude_lines)
    texts = [" ".join(ls) for ls in (prose_lines(f) for f in files) if ls]
    if not texts:
        raise ValueError(f"exclude_lines: no prose left for calibration after leaving out the files of the "
                         f"check's first {exclude_lines} lines")
    rng = random.Random(f"calibration-prose-{seed}")
    buf: list[int] = []
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    while True:
        order = list(texts)
        rng.shuffle(order)
        for t in order:
            buf.extend(enc(" " + t))
            while len(buf) >= length:
                chunk, buf = buf[:length], buf[length:]
                yield torch.tensor([chunk], dtype=torch.long)
