"""Teacher-forced passkey scoring: the answer decided by one forward over prompt + answer (the
prompt and every answer token through the (sparse) prefill), shared by the prefill quality driver,
the demo, the approximations and the analyses."""
from __future__ import annotations

from typing import Sequence

import torch


# ----------------------------------------------------------------------------------------------
# teacher-forced passkey scoring
# ----------------------------------------------------------------------------------------------

def teacher_forced_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """teacher_forced_ids: ``(prompt ids, answer ids)`` whose concatenation is the tokenization of
    ``prompt + " " + answer`` (the answer follows the question after one space, as in training).

    Raises:
        ValueError: the tokenizer merges across the prompt/answer boundary (the concatenation would
            not be what the model sees), or the answer is empty.
    """
    from .tasks import encode_ids

    if not isinstance(answer, str) or not answer:
        raise ValueError(f"answer: expected a non-empty string, got {answer!r}")
    p = encode_ids(tokenizer, prompt)
    a = encode_ids(tokenizer, " " + answer, add_special_tokens=False)
    full = encode_ids(tokenizer, prompt + " " + answer)
    if full != p + a:
        raise ValueError("tokenizer: prompt + ' ' + answer does not tokenize as the prompt's tokens followed by the "
                         "answer's tokens; teacher forcing needs a clean token boundary")
    return p, a


def score_teacher_forced(pred, answer) -> dict:
    """score_teacher_forced: compare predicted token ids with the gold answer ids.

    Args:
        pred: the argmax prediction at each answer position (``[n]`` ints or a 1-D tensor), i.e. the
            prediction for answer token ``j`` made at position ``prompt_len - 1 + j``.
        answer: the gold answer ids (``[n]``).
    Returns:
        ``{"correct": bool (every token right), "token_acc": fraction right, "first_ok": bool,
        "n_wrong": int, "hits": [bool per token]}``.
    Raises:
        ValueError: empty answer or different lengths.
    """
    p = [int(x) for x in (pred.tolist() if isinstance(pred, torch.Tensor) else pred)]
    a = [int(x) for x in (answer.tolist() if isinstance(answer, torch.Tensor) else answer)]
    if not a:
        raise ValueError("answer: expected at least one token, got none")
    if len(p) != len(a):
        raise ValueError(f"pred: expected {len(a)} predictions (one per answer token), got {len(p)}")
    hits = [x == y for x, y in zip(p, a)]
    return {"correct": all(hits), "token_acc": sum(hits) / len(hits), "first_ok": hits[0],
            "n_wrong": len(hits) - sum(hits), "hits": hits}


def teacher_forced_predict(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], device) -> torch.Tensor:
    """teacher_forced_predict: argmax predictions ``[len(answer)]`` at the answer positions of ONE forward
    pass over ``prompt + answer`` (whatever attention the model is patched with), no KV cache."""
    n = len(answer_ids)
    if n < 1 or len(prompt_ids) < 1:
        raise ValueError(f"prompt_ids, answer_ids: expected non-empty lists, got {len(prompt_ids)} and {n} tokens")
    x = torch.tensor([list(prompt_ids) + list(answer_ids)], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=x, use_cache=False, logits_to_keep=n + 1)
    lg = out.logits[0]
    if lg.shape[0] != n + 1:  # a model that ignores logits_to_keep returns every position
        lg = lg[-(n + 1):]
    if not bool(torch.isfinite(lg[:n]).all()):
        raise FloatingPointError("logits: non-finite values at the answer positions")
    return lg[:n].argmax(-1).cpu()
