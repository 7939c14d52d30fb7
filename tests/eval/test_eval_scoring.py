"""Tests of sparsattn.eval.scoring on hand-made cases."""
from __future__ import annotations

import pytest

from sparsattn.eval.scoring import (SCORERS, get_scorer, score_predictions, string_match_all,
                                    string_match_part)


def test_string_match_all():
    assert string_match_all("The number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("the answer: ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert string_match_all("nothing here", ["x1", "y2"]) == 0.0
    assert string_match_all("", ["a"]) == 0.0
    # substring semantics (RULER): a longer number containing the answer counts
    assert string_match_all("12345678", ["1234567"]) == 1.0


def test_string_match_part():
    assert string_match_part("only the second: beta", ["alpha", "BETA"]) == 1.0
    assert string_match_part("none", ["alpha", "beta"]) == 0.0


def test_score_predictions_scale_and_mean():
    preds = ["1234567", "wrong", "EVKEF AZZSD"]
    answers = [["1234567"], ["7654321"], ["evkef", "azzsd", "psgbv", "zcyww"]]
    assert score_predictions("variable_tracking", preds, answers) == pytest.approx(100 * (1 + 0 + 0.5) / 3)


def test_errors():
    with pytest.raises(ValueError, match="answers"):
        string_match_all("x", [])
    with pytest.raises(ValueError, match="answers"):
        string_match_all("x", "abc")
    with pytest.raises(ValueError, match="prediction"):
        string_match_part(None, ["a"])
    with pytest.raises(ValueError, match="passkey"):
        get_scorer("bogus")
    with pytest.raises(ValueError, match="predictions"):
        score_predictions("passkey", ["a"], [["a"], ["b"]])
    assert all(f is string_match_all for f in SCORERS.values())


def test_exact_match_counts_whole_tokens_only():
    from sparsattn.eval.scoring import EXACT_SCORERS, exact_match_all, exact_match_part

    # RULER's substring match counts a longer number that contains the passkey; the exact score does not
    assert string_match_all("72894720", ["7289472"]) == 1.0
    assert exact_match_all("72894720", ["7289472"]) == 0.0
    assert exact_match_all("17289472", ["7289472"]) == 0.0
    assert exact_match_all("The pass key is 7289472.", ["7289472"]) == 1.0
    assert exact_match_all("7289472", ["7289472"]) == 1.0
    assert exact_match_all("(7289472)\n", ["7289472"]) == 1.0
    assert exact_match_all("EVKEF, azzsd; xpsgbv", ["evkef", "AZZSD", "psgbv"]) == pytest.approx(2 / 3)
    assert exact_match_all("n = -5!", ["-5"]) == 1.0  # an answer starting with punctuation
    assert exact_match_part("72894720 or 7289472", ["7289472", "1"]) == 1.0
    assert exact_match_part("72894720", ["7289472"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        exact_match_all("x", [])
    assert set(EXACT_SCORERS) == set(SCORERS)
    assert get_scorer("passkey", exact=True) is exact_match_all
    assert get_scorer("passkey") is string_match_all  # RULER's metric stays the default
    assert score_predictions("passkey", ["72894720", "7289472"], [["7289472"]] * 2) == 100.0
    assert score_predictions("passkey", ["72894720", "7289472"], [["7289472"]] * 2, exact=True) == 50.0
    with pytest.raises(ValueError, match="exact"):
        get_scorer("passkey", exact="yes")
