"""Evaluation: offline tasks (RULER-style, MQAR, ListOps), scoring, perplexity, fidelity vs dense attention.

Everything is generated or read from local files; see /work/shared/EVAL.md for the protocols.
"""
from .tasks import (
    Sample, TASKS, DEPTH_TASKS, get_task, make_samples, count_tokens, encode_ids,
    passkey, multikey_needle, variable_tracking, common_words, frequent_words,
    NOISE_SENTENCES, NEEDLE_TEMPLATE, QUESTION_TEMPLATE, PREAMBLE,
)
from .scoring import SCORERS, get_scorer, score_predictions, string_match_all, string_match_part
from .mqar import mqar, mqar_accuracy
from .listops import listops_dataset, evaluate as listops_evaluate, encode as listops_encode, \
    decode as listops_decode, VOCAB as LISTOPS_VOCAB
from .fidelity import FidelityReport, attention_fidelity
from .perplexity import PerplexityResult, perplexity, heldout_token_stream

__all__ = [
    "Sample", "TASKS", "DEPTH_TASKS", "get_task", "make_samples", "count_tokens", "encode_ids",
    "passkey", "multikey_needle", "variable_tracking", "common_words", "frequent_words",
    "NOISE_SENTENCES", "NEEDLE_TEMPLATE", "QUESTION_TEMPLATE", "PREAMBLE",
    "SCORERS", "get_scorer", "score_predictions", "string_match_all", "string_match_part",
    "mqar", "mqar_accuracy",
    "listops_dataset", "listops_evaluate", "listops_encode", "listops_decode", "LISTOPS_VOCAB",
    "FidelityReport", "attention_fidelity",
    "PerplexityResult", "perplexity", "heldout_token_stream",
]
