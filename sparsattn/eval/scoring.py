"""Scoring of generated answers for the offline tasks (RULER metrics, Hsieh et al., arXiv 2404.06654).

RULER scores every synthetic task with ``string_match_all``: the fraction of expected strings
found, case-insensitively, anywhere in the model's output; reported x100 and averaged over samples.
Kept as the default for comparability with RULER's numbers, but a substring match also counts a
wrong longer answer (``72894720`` contains the passkey ``7289472``). The ``exact_*`` scorers
(``exact_match_all`` / ``exact_match_part``, ``get_scorer(task, exact=True)``) count an expected
string only where it stands as a whole token: not preceded or followed by a letter or digit.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence


def _check(prediction: str, answers: Sequence[str]) -> None:
    if not isinstance(prediction, str):
        raise ValueError(f"prediction: expected a str, got {type(prediction).__name__}")
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise ValueError(f"answers: expected a non-empty list of str, got {answers!r}")
    if not all(isinstance(a, str) and a for a in answers):
        raise ValueError(f"answers: expected non-empty strings, got {answers!r}")


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """string_match_all: fraction of ``answers`` found in ``prediction`` (RULER, arXiv 2404.06654).

    Case-insensitive substring match; returns a float in [0, 1].
    Raises:
        ValueError: ``prediction`` not a str, or ``answers`` empty / not strings.
    """
    _check(prediction, answers)
    pred = prediction.lower()
    return sum(1.0 for a in answers if a.lower() in pred) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """string_match_part: 1.0 if any of ``answers`` is found in ``prediction``, else 0.0 (RULER, arXiv 2404.06654).

    Case-insensitive substring match.
    """
    _check(prediction, answers)
    pred = prediction.lower()
    return 1.0 if any(a.lower() in pred for a in answers) else 0.0


def _bounded(answer: str) -> "re.Pattern":
    """The regex of ``answer`` as a whole token: no letter or digit right before (after) it when its
    first (last) character is a letter or digit; case-insensitive."""
    left = r"(?<![^\W_])" if answer[0].isalnum() else ""
    right = r"(?![^\W_])" if answer[-1].isalnum() else ""
    return re.compile(left + re.escape(answer) + right, re.IGNORECASE)


def exact_match_all(prediction: str, answers: Sequence[str]) -> float:
    """exact_match_all: fraction of ``answers`` found in ``prediction`` as whole tokens.

    As RULER's ``string_match_all`` (arXiv 2404.06654), case-insensitive, but an answer counts only
    where no letter or digit touches it: ``"72894720"`` does not contain the passkey ``"7289472"``,
    ``"is 7289472."`` does. Returns a float in [0, 1].
    Raises:
        ValueError: ``prediction`` not a str, or ``answers`` empty / not strings.
    """
    _check(prediction, answers)
    return sum(1.0 for a in answers if _bounded(a).search(prediction)) / len(answers)


def exact_match_part(prediction: str, answers: Sequence[str]) -> float:
    """exact_match_part: 1.0 if any of ``answers`` is found in ``prediction`` as a whole token, else 0.0
    (token-boundary version of RULER's ``string_match_part``, arXiv 2404.06654)."""
    _check(prediction, answers)
    return 1.0 if any(_bounded(a).search(prediction) for a in answers) else 0.0


#: default scorer of each task of ``sparsattn.eval.tasks.TASKS`` (RULER uses match-all for all of them)
SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "passkey": string_match_all,
    "multikey_needle": string_match_all,
    "variable_tracking": string_match_all,
    "common_words": string_match_all,
    "frequent_words": string_match_all,
}


#: the token-boundary scorer of each task (``get_scorer(task, exact=True)``)
EXACT_SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {t: exact_match_all for t in SCORERS}


def get_scorer(task: str, exact: bool = False) -> Callable[[str, Sequence[str]], float]:
    """get_scorer: the default scorer of ``task`` (RULER's substring match), or with ``exact=True`` the
    token-boundary one (``exact_match_all``).

    Raises:
        ValueError: unknown task (the message lists the valid names), ``exact`` not a bool.
    """
    if not isinstance(exact, bool):
        raise ValueError(f"exact: expected a bool, got {exact!r}")
    table = EXACT_SCORERS if exact else SCORERS
    try:
        return table[task]
    except (KeyError, TypeError):
        raise ValueError(f"task: no scorer for {task!r}; valid names: {', '.join(sorted(table))}") from None


def score_predictions(task: str, predictions: Sequence[str], answers: Sequence[Sequence[str]], *,
                      exact: bool = False) -> float:
    """score_predictions: a task's score over samples, x100 (RULER's reporting scale).

    Args:
        task: task name (selects the scorer).
        predictions: model outputs, one per sample.
        answers: expected strings per sample (e.g. ``[s.answers for s in samples]``).
        exact: score whole tokens only (``exact_match_all``) instead of RULER's substring match.
    Returns:
        mean per-sample score times 100, in [0, 100].
    Raises:
        ValueError: unknown task, empty input, or length mismatch.
    """
    scorer = get_scorer(task, exact)
    if len(predictions) == 0 or len(predictions) != len(answers):
        raise ValueError(f"predictions: expected a non-empty list as long as answers ({len(answers)}), "
                         f"got {len(predictions)}")
    return 100.0 * sum(scorer(p, a) for p, a in zip(predictions, answers)) / len(predictions)
