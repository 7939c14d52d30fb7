"""Needle-in-a-haystack tasks: ``passkey`` and ``multikey_needle`` (RULER's NIAH)."""
from __future__ import annotations

import random
from typing import Any

from ._base import (HAYSTACK_KINDS, NEEDLE_TEMPLATE, NEEDLE_TEMPLATE_UUID, PREAMBLE, PREAMBLE_UUID, QUESTION_TEMPLATE,
                    QUESTION_TEMPLATE_UUID, Sample, _Haystack, _assemble, _check_common, _check_depth,
                    _estimate_tpu, _fit_units, _gap_index, _random_key, _random_value, _rng, count_tokens,
                    encode_ids)


# ----------------------------------------------------------------------------------------------
# Needle tasks
# ----------------------------------------------------------------------------------------------

def _templates(value_kind: str) -> tuple[str, str, str]:
    if value_kind == "number":
        return PREAMBLE, NEEDLE_TEMPLATE, QUESTION_TEMPLATE
    if value_kind == "uuid":
        return PREAMBLE_UUID, NEEDLE_TEMPLATE_UUID, QUESTION_TEMPLATE_UUID
    raise ValueError(f"value_kind: expected 'number' or 'uuid', got {value_kind!r}")


def _needle_sample(task: str, tokenizer: Any, length: int, depth: float, *, seed: int,
                   haystack: str, key_kind: str, value_kind: str, n_distractors: int) -> Sample:
    """Shared builder for single-needle and multi-key-needle prompts."""
    _check_common(length, seed)
    depth = _check_depth(depth)
    if haystack not in HAYSTACK_KINDS + ("needle",):
        raise ValueError(f"haystack: expected one of {HAYSTACK_KINDS + ('needle',)}, got {haystack!r}")
    preamble, needle_tpl, question_tpl = _templates(value_kind)
    _random_key(random.Random(0), key_kind)  # validates key_kind

    rng = _rng(task, "needle", seed)
    key = _random_key(rng, key_kind)

    if haystack == "needle":
        # every haystack unit is a distractor needle with another key (RULER niah_multikey_2/3)
        d_rng = _rng(task, "distractors", seed)
        stream: list[str] = []

        def units(n: int) -> list[str]:
            while len(stream) < n:
                k = _random_key(d_rng, key_kind)
                while k == key:
                    k = _random_key(d_rng, key_kind)
                stream.append(needle_tpl.format(key=k, value=_random_value(d_rng, value_kind)))
            return stream[:n]
        sep = "\n"
        hay = None
        distractor_fracs: list[float] = []
        distractors: list[str] = []
    else:
        hay = _Haystack(haystack, seed)
        units = hay.units
        sep = hay.sep
        d_rng = _rng(task, "distractors", seed)
        distractors = []
        keys_used = {key}
        for _ in range(n_distractors):
            k = _random_key(d_rng, key_kind)
            while k in keys_used:
                k = _random_key(d_rng, key_kind)
            keys_used.add(k)
            distractors.append(needle_tpl.format(key=k, value=_random_value(d_rng, value_kind)))
        distractor_fracs = [d_rng.random() for _ in distractors]

    for attempt in range(32):
        value = _random_value(rng, value_kind)
        needle = needle_tpl.format(key=key, value=value)
        if any(value in d for d in distractors):
            continue

        def build(n: int, needle=needle) -> tuple[str, Any]:
            us = units(n)
            g = _gap_index(depth, n)
            inserts: dict[int, list[tuple[str, Any]]] = {}
            for i, (frac, d) in enumerate(zip(distractor_fracs, distractors)):
                inserts.setdefault(_gap_index(frac, n), []).append((d, ("distractor", i)))
            # the target needle goes after any distractor that shares its gap
            inserts.setdefault(g, []).append((needle, "needle"))
            context, offsets = _assemble(us, inserts, sep)
            head = preamble + "\n"
            prompt = head + context + "\n" + question_tpl.format(key=key)
            return prompt, {"gap": g, "needle_char": len(head) + offsets["needle"],
                            "distractor_chars": sorted(len(head) + v for t, v in offsets.items()
                                                       if isinstance(t, tuple))}

        tpu = _estimate_tpu(tokenizer, units(64), sep)
        fit = _fit_units(build, tokenizer, length, n_min=0, tokens_per_unit=tpu, task=task)
        # the value must occur exactly once (a code haystack may contain the number by chance)
        if fit.prompt.count(value) == 1 and fit.prompt.count(needle) == 1:
            break
    else:  # pragma: no cover - needs 32 unlucky draws
        raise RuntimeError(f"{task}: could not place a unique needle value after 32 attempts")

    needle_char = fit.extra["needle_char"]
    meta = {
        "task": task, "length": length, "n_tokens": fit.n_tokens, "seed": seed,
        "haystack": haystack, "key_kind": key_kind, "value_kind": value_kind,
        "key": key, "value": value, "needle": needle,
        "depth": depth, "n_units": fit.n, "needle_unit": fit.extra["gap"],
        "depth_actual": (fit.extra["gap"] / fit.n) if fit.n else 0.0,
        "needle_char": needle_char,
        "needle_token": count_tokens(tokenizer, fit.prompt[:needle_char]),
        "needle_n_tokens": len(encode_ids(tokenizer, needle, add_special_tokens=False)),
    }
    if haystack != "needle":
        meta["n_distractors"] = len(distractors)
        meta["distractor_chars"] = fit.extra["distractor_chars"]
    return Sample(prompt=fit.prompt, answers=[value], meta=meta)


def passkey(tokenizer: Any, length: int, depth: float, *, seed: int, haystack: str = "noise",
            key_kind: str = "words") -> Sample:
    """passkey: one needle in a haystack (RULER niah_single, Hsieh et al., arXiv 2404.06654).

    Args:
        tokenizer: a ``transformers``/``tokenizers`` tokenizer or any object with ``encode``.
        length: target prompt length in tokens (the prompt never exceeds it).
        depth: fractional needle position in the haystack, 0.0 (start) .. 1.0 (end); the needle is
            inserted at the nearest sentence (noise) or line (code) boundary.
        seed: makes the sample deterministic.
        haystack: ``"noise"`` (the five repeated sentences of ``NOISE_SENTENCES``), ``"code"``
            (held-out Python source files of this installation, chosen by the seed) or ``"prose"``
            (prose lines of the installation's documentation, ``sparsattn.data.prose``: text the
            bundled model never saw).
        key_kind: ``"words"`` (adjective-noun), ``"uuid"`` or ``"number"``.
    Returns:
        ``Sample`` with ``answers=[value]`` (a 7-digit number that appears once in the prompt);
        ``meta`` has ``needle_char`` (offset in the prompt), ``needle_token`` (tokens before it),
        ``depth_actual`` (units before the needle / units) and ``n_tokens``.
    """
    if haystack not in HAYSTACK_KINDS:
        raise ValueError(f"haystack: expected one of {HAYSTACK_KINDS}, got {haystack!r}")
    return _needle_sample("passkey", tokenizer, length, depth, seed=seed, haystack=haystack,
                          key_kind=key_kind, value_kind="number", n_distractors=0)


def multikey_needle(tokenizer: Any, length: int, depth: float, *, seed: int, haystack: str = "needle",
                    key_kind: str = "words", value_kind: str = "number", n_keys: int = 4) -> Sample:
    """multikey_needle: a needle among distractor needles with other keys (RULER niah_multikey, arXiv 2404.06654).

    Args:
        tokenizer, length, depth, seed: as in ``passkey``.
        haystack: ``"needle"`` (the haystack is made of distractor needles, RULER multikey_2/3),
            ``"noise"`` or ``"code"`` (``n_keys - 1`` distractor needles at random positions in it,
            RULER multikey_1).
        key_kind: ``"words"``, ``"uuid"`` (multikey_3 uses uuid keys and values) or ``"number"``.
        value_kind: ``"number"`` (7 digits) or ``"uuid"``.
        n_keys: needles in a noise/code haystack, the queried one included (ignored for "needle").
    Returns:
        ``Sample`` with ``answers=[value]``; ``meta`` as in ``passkey``.
    """
    if isinstance(n_keys, bool) or not isinstance(n_keys, int) or n_keys < 1:
        raise ValueError(f"n_keys: expected an int >= 1, got {n_keys!r}")
    return _needle_sample("multikey_needle", tokenizer, length, depth, seed=seed, haystack=haystack,
                          key_kind=key_kind, value_kind=value_kind,
                          n_distractors=0 if haystack == "needle" else n_keys - 1)
