"""RazorAttention calibration of a model: echo / induction head scores on a repeated random-token
probe (RazorAttention: Efficient KV Cache Compression Through Retrieval Heads, arXiv 2407.15891).

Model-level fitting of ``sparsattn.methods.razor.RazorAttention``: capture q/k of every layer on
``repeated_random_tokens(vocab, period, repeats)`` (data-free) and call ``RazorAttention.fit``.
``sparsattn calibrate razor`` runs it; its defaults regenerate the shipped ``razor.json``.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

from ..methods.razor import RazorAttention, repeated_random_tokens

OUT = "razor.json"
PROVENANCE_KEY = "razor"
DEFAULTS = {"period": 512, "repeats": 4, "seed": 0, "low": 16}


def fit_razor(model, tokenizer, *, period: int = 512, repeats: int = 4, seed: int = 0, low: int = 16,
              out=None, **config) -> RazorAttention:
    """fit_razor: capture q/k of ``model`` on ``period`` random token ids (from ``[low, vocab)``,
    seed ``seed``) repeated ``repeats`` times and fit RazorAttention (``config``: its
    hyper-parameters, e.g. ``echo_fraction``); saved to ``out`` when given."""
    from ..capture import capture_qkv  # lazy: transformers

    vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else len(tokenizer)
    ids = repeated_random_tokens(vocab, period, repeats, seed=seed, low=low)[None]
    dev = next(model.parameters()).device
    cap = capture_qkv(model, ids.to(dev))
    n_layers = model.config.get_text_config().num_hidden_layers if hasattr(model.config, "get_text_config") \
        else model.config.num_hidden_layers
    return RazorAttention.fit({l: (q, k) for l, (q, k, *_) in cap.items()}, period, path=out,
                              num_layers=n_layers, **config)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The method options of ``sparsattn calibrate razor``."""
    p.add_argument("--period", type=int, default=DEFAULTS["period"], help="random tokens per repeat (512)")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="repeats of the random tokens (4)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--low", type=int, default=DEFAULTS["low"], help="smallest token id drawn (16: skips specials)")


def run(model_path: Optional[str], out: str, *, device: str = "cpu", period: int = 512, repeats: int = 4,
        seed: int = 0, low: int = 16) -> tuple:
    """run: ``(fitted RazorAttention, provenance record)`` of the model at ``model_path`` (None: bundled)."""
    from ._common import call_text, load_model

    t0 = time.time()
    model, tok, _ = load_model(model_path, device=device)
    r = fit_razor(model, tok, period=period, repeats=repeats, seed=seed, low=low, out=out)
    rec = {"call": call_text("razor", dict(period=period, repeats=repeats, seed=seed, low=low)),
           "seconds": round(time.time() - t0, 1),
           "data": f"data-free: {period} random token ids repeated {repeats} times ({period * repeats} tokens)",
           "retrieval_heads": {str(l): h for l, h in r.retrieval_heads.items()}}
    return r, rec
