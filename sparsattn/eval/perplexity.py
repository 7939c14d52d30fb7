"""Held-out perplexity at several context lengths (the language-modelling check of EVAL.md section 6).

The token stream is cut into non-overlapping windows of each length; every window is one forward
pass of a causal LM, and the loss covers all of its predicted tokens (positions 1..L-1). The
cross-entropy is computed in fp32, in row chunks, so no fp32 copy of the full [L, V] logits is made.
"""
from __future__ import annotations

import inspect
import math
import random
from dataclasses import dataclass, asdict
from typing import Any, Sequence

import torch

from .tasks import encode_ids


@dataclass
class PerplexityResult:
    """PerplexityResult: perplexity of one context length.

    Attributes:
        length: window length in tokens.
        ppl: exp(nll).
        nll: mean negative log-likelihood per predicted token (nats).
        n_tokens: predicted tokens (``n_windows * (length - 1)``).
        n_windows: windows evaluated.
    """
    length: int
    ppl: float
    nll: float
    n_tokens: int
    n_windows: int

    def to_row(self, **extra: Any) -> dict:
        """to_row: the result as a flat dict (plus ``extra`` columns) for CSV."""
        row = asdict(self)
        row.update(extra)
        return row


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _forward_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    fwd = getattr(model, "forward", model)
    try:
        takes_cache = "use_cache" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        takes_cache = False
    out = model(ids, use_cache=False) if takes_cache else model(ids)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(f"model: expected logits [batch, tokens, vocab] for input {tuple(ids.shape)}, "
                         f"got {getattr(logits, 'shape', type(logits).__name__)}")
    return logits


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int = 1024) -> float:
    """Sum of fp32 cross-entropy of logits[:, t] against targets[:, t], in row chunks."""
    total = 0.0
    n = logits.shape[1]
    for s in range(0, n, rows_per_chunk):
        e = min(n, s + rows_per_chunk)
        lg = logits[:, s:e].float()
        total += float(torch.nn.functional.cross_entropy(
            lg.reshape(-1, lg.shape[-1]), targets[:, s:e].reshape(-1), reduction="sum"))
    return total


@torch.no_grad()
def perplexity(model: Any, input_ids: torch.Tensor, *, lengths: Sequence[int] = (2048, 8192, 16384),
               batch_size: int = 1, max_windows: int | None = None,
               progress: bool = True) -> dict[int, PerplexityResult]:
    """perplexity: held-out perplexity of a causal LM at several context lengths.

    Args:
        model: an HF causal LM (or any module: ``model(ids)`` -> ``.logits`` [B, L, V]); it is run
            under ``torch.no_grad()``, on its own device, with ``use_cache=False`` when accepted.
        input_ids: token stream, LongTensor [N] or [1, N].
        lengths: window lengths; each is cut into ``N // length`` non-overlapping windows.
        batch_size: windows per forward pass.
        max_windows: evaluate at most this many windows per length (the first ones).
        progress: show a tqdm bar.
    Returns:
        dict length -> ``PerplexityResult``.
    Raises:
        ValueError: input not a 1-D stream of ints, a length < 2 or longer than the stream,
            bad ``batch_size``/``max_windows``, or a model output that is not logits.
    """
    ids = input_ids
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: expected an int64/int32 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids: expected a token stream [N] or [1, N], got {tuple(input_ids.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows: expected a positive int or None, got {max_windows!r}")
    lengths = list(lengths)
    if not lengths:
        raise ValueError("lengths: expected at least one length")
    for L in lengths:
        if isinstance(L, bool) or not isinstance(L, int) or L < 2 or L > ids.numel():
            raise ValueError(f"lengths: each must be an int in [2, {ids.numel()}] (the stream length), got {L!r}")
    dev = _model_device(model)
    ids = ids.long()

    plan = []
    for L in lengths:
        n_win = ids.numel() // L
        if max_windows is not None:
            n_win = min(n_win, max_windows)
        plan.append((L, n_win))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(n for _, n in plan), desc="perplexity", leave=False)
    results: dict[int, PerplexityResult] = {}
    for L, n_win in plan:
        windows = ids[: n_win * L].view(n_win, L)
        nll = 0.0
        for s in range(0, n_win, batch_size):
            batch = windows[s:s + batch_size].to(dev)
            logits = _forward_logits(model, batch)
            nll += _nll_sum(logits[:, :-1], batch[:, 1:])
            del logits
            if bar is not None:
                bar.update(batch.shape[0])
        n_tok = n_win * (L - 1)
        mean = nll / n_tok
        if not math.isfinite(mean):
            raise ValueError(f"model: non-finite loss at length {L} (nll={mean})")
        results[L] = PerplexityResult(length=L, ppl=math.exp(mean), nll=mean, n_tokens=n_tok, n_windows=n_win)
    if bar is not None:
        bar.close()
    return results


def heldout_token_stream(tokenizer: Any, n_tokens: int, *, seed: int) -> torch.Tensor:
    """heldout_token_stream: ``n_tokens`` token ids of held-out source text (``source_files("heldout")``).

    Files are taken in a seeded random order and encoded without special tokens; when the tokenizer
    has an ``eos_token_id`` it separates files. Deterministic for a given seed and installation.
    Returns:
        LongTensor [n_tokens].
    Raises:
        ValueError: ``n_tokens`` < 1, or the held-out corpus is too small.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens: expected a positive int, got {n_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    from ..data import read_source_text
    from .tasks import _base  # the one held-out file list of the tasks (patched in tests)
    files = list(_base._heldout_files())
    random.Random(seed).shuffle(files)
    eos = getattr(tokenizer, "eos_token_id", None)
    out: list[int] = []
    for path in files:
        try:
            text = read_source_text(path)
        except OSError:
            continue
        if out and isinstance(eos, int):
            out.append(eos)
        out.extend(encode_ids(tokenizer, text, add_special_tokens=False))
        if len(out) >= n_tokens:
            return torch.tensor(out[:n_tokens], dtype=torch.long)
    raise ValueError(f"n_tokens: the held-out corpus has only {len(out)} tokens, fewer than {n_tokens}")
