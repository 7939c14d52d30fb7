"""RazorAttention calibration of a model: which heads keep the whole context (RazorAttention:
Efficient KV Cache Compression Through Retrieval Heads, arXiv 2407.15891).

Two sources of the retrieval heads:

* ``--source retrieval`` (default, the shipped file): the retrieval-head score of Wu et al.
  (Retrieval Head Mechanistically Explains Long-Context Factuality, arXiv 2404.15574;
  ``sparsattn.analysis.retrieval_heads.score_sample``: the head's top-1 attention lands on the
  needle token being copied) averaged over passkey prompts of a training-split haystack at
  ``lengths`` x ``depths`` (``calibrate._retrieval.retrieval_prompts``, never the evaluation
  haystacks); heads scoring above ``threshold`` (0.1, the paper's) are retrieval heads, at most
  ``max_heads``; the scores are stored (``data.<layer>.retrieval``) so a tool can take the top n.
* ``--source echo``: the paper's data-free probe: echo / induction scores on
  ``repeated_random_tokens(vocab, period, repeats)`` and ``RazorAttention.fit``.

``sparsattn calibrate razor`` runs it; its defaults regenerate the shipped ``razor.json``.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

from ..methods.razor import RazorAttention, repeated_random_tokens

OUT = "razor.json"
PROVENANCE_KEY = "razor"
DEFAULTS = {"source": "retrieval", "lengths": (1024, 2048, 4096), "depths": 5, "threshold": 0.1, "max_heads": 8,
            "period": 512, "repeats": 4, "seed": 0, "low": 16}


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


def fit_razor_retrieval(model, tokenizer, *, lengths=(1024, 2048, 4096), depths: int = 5, threshold: float = 0.1,
                        max_heads: int = 8, seed: int = 0, out=None, haystack=None, probe=(512, 4, 16)) -> tuple:
    """fit_razor_retrieval: retrieval-head scores ``[layers, heads]`` of ``model`` on passkey prompts at
    ``lengths`` x ``depths`` needle depths (``retrieval_prompts``, seed ``seed``; ``haystack`` as
    there) and the RazorAttention calibration keeping the heads above ``threshold`` (at most
    ``max_heads``, by score) -> ``(RazorAttention, scores, copied fraction)``; saved to ``out``.
    ``probe``: ``(period, repeats, low)`` of the data-free echo / induction probe whose scores are
    stored beside (None: not run)."""
    import torch

    from ..analysis.fit_methods import model_shape
    from ..analysis.retrieval_heads import score_sample
    from ..calibration import save_calibration
    from ._retrieval import retrieval_prompts

    dev = next(model.parameters()).device
    trials, copied, total = [], 0, 0
    for L in lengths:
        for p in retrieval_prompts(tokenizer, int(L), depths, seed=seed + int(L), haystack=haystack):
            ids = p["ids"][0].tolist()
            P = p["prompt_len"]
            with torch.no_grad():
                sc, info = score_sample(model, ids[:P], ids[P:], str(dev))
            trials.append(sc)
            copied += info["copied"]
            total += info["needle_len"]
    scores = torch.stack(trials).mean(0)
    shape = model_shape(model)
    flat = scores.flatten()
    n = int(min(max_heads, int((flat > threshold).sum())))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if n:
        keep[torch.topk(flat, n).indices] = True
    keep = keep.view(scores.shape)
    data = {str(l): {"retrieval_heads": keep[l].nonzero().flatten().tolist(), "retrieval": scores[l].tolist()}
            for l in range(shape.num_layers)}
    if probe is not None:  # the data-free echo / induction scores too (tools that rank by them, comparisons)
        from ..capture import capture_qkv
        from ..methods.razor import echo_induction_scores, repeated_random_tokens

        period, repeats, low = probe
        vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else len(tokenizer)
        rnd = repeated_random_tokens(vocab, period, repeats, seed=seed, low=low)[None].to(dev)
        with torch.no_grad():
            cap = capture_qkv(model, rnd)
        for l, (q, k, *_) in cap.items():
            e, i = echo_induction_scores(q, k, period)
            data[str(l)].update(echo=e.tolist(), induction=i.tolist())
    cfg = {"source": "retrieval-head score (arXiv 2404.15574)", "threshold": threshold, "max_heads": max_heads,
           "lengths": list(map(int, lengths)), "depths": depths,
           "probe": None if probe is None else {"period": probe[0], "repeats": probe[1], "low": probe[2]}}
    if out is not None:
        save_calibration(out, "razor", shape, data, cfg)
        r = RazorAttention.load(out)
    else:
        r = RazorAttention()
        r._set(shape, data)
    return r, scores, copied / max(1, total)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The method options of ``sparsattn calibrate razor``."""
    p.add_argument("--source", choices=("retrieval", "echo"), default=DEFAULTS["source"],
                   help="retrieval: retrieval-head scores on passkey prompts (default); echo: the data-free probe")
    p.add_argument("--lengths", type=lambda s: tuple(int(x) for x in s.split(",")), default=DEFAULTS["lengths"],
                   help="retrieval: comma list of prompt lengths (1024,2048,4096)")
    p.add_argument("--depths", type=int, default=DEFAULTS["depths"], help="retrieval: needle depths per length (5)")
    p.add_argument("--threshold", type=float, default=DEFAULTS["threshold"], help="retrieval: head score threshold (0.1)")
    p.add_argument("--max-heads", type=int, default=DEFAULTS["max_heads"], help="retrieval: at most this many heads (8)")
    p.add_argument("--period", type=int, default=DEFAULTS["period"], help="echo: random tokens per repeat (512)")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="echo: repeats of the random tokens (4)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--low", type=int, default=DEFAULTS["low"], help="echo: smallest token id drawn (16: skips specials)")


def run(model_path: Optional[str], out: str, *, device: str = "cpu", source: str = "retrieval",
        lengths=(1024, 2048, 4096), depths: int = 5, threshold: float = 0.1, max_heads: int = 8, period: int = 512,
        repeats: int = 4, seed: int = 0, low: int = 16) -> tuple:
    """run: ``(fitted RazorAttention, provenance record)`` of the model at ``model_path`` (None: bundled)."""
    from ._common import call_text, load_model

    t0 = time.time()
    model, tok, _ = load_model(model_path, device=device)
    if source == "retrieval":
        r, scores, frac = fit_razor_retrieval(model, tok, lengths=lengths, depths=depths, threshold=threshold,
                                              max_heads=max_heads, seed=seed, out=out, probe=(period, repeats, low))
        top = sorted(((float(scores[l, h]), l, h) for l in range(scores.shape[0]) for h in range(scores.shape[1])),
                     reverse=True)[:12]
        rec = {"call": call_text("razor", dict(source=source, lengths=lengths, depths=depths, threshold=threshold,
                                               max_heads=max_heads, seed=seed)),
               "seconds": round(time.time() - t0, 1),
               "data": f"passkey prompts (calibrate._retrieval.retrieval_prompts, training-split source haystack, "
                       f"seed {seed} + length) at lengths {tuple(lengths)} x {depths} depths; dense model copied "
                       f"{frac:.3f} of the answer tokens; echo / induction scores stored beside, from {period} "
                       f"random token ids repeated {repeats} times",
               "top_heads": [[l, h, round(s, 4)] for s, l, h in top]}
    elif source == "echo":
        r = fit_razor(model, tok, period=period, repeats=repeats, seed=seed, low=low, out=out)
        rec = {"call": call_text("razor", dict(source=source, period=period, repeats=repeats, seed=seed, low=low)),
               "seconds": round(time.time() - t0, 1),
               "data": f"data-free: {period} random token ids repeated {repeats} times ({period * repeats} tokens)"}
    else:
        raise ValueError(f"source: expected 'retrieval' or 'echo', got {source!r}")
    rec["retrieval_heads"] = {str(l): h for l, h in r.retrieval_heads.items()}
    return r, rec
