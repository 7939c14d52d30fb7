"""MInference calibration of a model: the offline kernel-aware search of each head's pattern type
on q/k/v captured from one prompt (MInference 1.0: Accelerating Pre-filling for Long-Context LLMs
via Dynamic Sparse Attention, arXiv 2407.02490).

Model-level fitting of ``sparsattn.methods.minference.MInference``: capture q/k/v of every layer on
one ``length``-token window of the training-split source files and call ``MInference.fit``
(``search_patterns``). ``sparsattn calibrate minference`` runs it; its defaults regenerate the
shipped ``minference.json`` (about 15 minutes on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Optional, Sequence

from ..methods.minference import MInference

OUT = "minference.json"
PROVENANCE_KEY = "minference"

#: the search grid of the shipped calibration, scaled to a 4K calibration prompt (the paper's grid
#: is for prompts of 8K tokens and more)
CANDIDATES = (
    {"type": "a_shape", "n_init": 64, "n_local": 512},
    {"type": "vertical_slash", "v_size": 30, "s_size": 400},
    {"type": "vertical_slash", "v_size": 100, "s_size": 350},
    {"type": "vertical_slash", "v_size": 250, "s_size": 300},
    {"type": "vertical_slash", "v_size": 800, "s_size": 64},
    {"type": "block_sparse", "top_k": 8},
)
DEFAULTS = {"length": 4096, "seed": 0, "budget": 0.3, "rows_from": 1024}


def fit_minference(model, tokenizer, *, length: int = 4096, seed: int = 0,
                   candidates: Optional[Sequence[dict]] = CANDIDATES, budget: Optional[float] = 0.3,
                   rows_from: int = 1024, ids=None, out=None, **config) -> MInference:
    """fit_minference: search each head's pattern on q/k/v of ``model`` captured on ``ids`` ``[1, T]``
    (default: the first ``length``-token window of ``token_windows(tokenizer, length, seed=seed)``)
    over ``candidates`` under ``budget``; ``config``: MInference.fit's other options; saved to ``out``."""
    from ..capture import capture_qkv  # lazy: transformers
    from ..train.seer_gate import token_windows

    if ids is None:
        ids = next(token_windows(tokenizer, length, seed=seed))
    cap = capture_qkv(model, ids.to(next(model.parameters()).device))
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # candidates clamped to short contexts warn once per head
        return MInference.fit(cap, list(candidates) if candidates is not None else None, budget=budget, path=out,
                              num_layers=cfg.num_hidden_layers, rows_from=rows_from, **config)


def _candidates_arg(s: str) -> list:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON list of candidate dicts: {e}") from None
    if not isinstance(v, list) or not all(isinstance(c, dict) for c in v):
        raise argparse.ArgumentTypeError("expected a JSON list of candidate dicts")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The method options of ``sparsattn calibrate minference``."""
    p.add_argument("--length", type=int, default=DEFAULTS["length"], help="tokens of the calibration prompt (4096)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="shuffle seed of the training files (0)")
    p.add_argument("--budget", type=float, default=DEFAULTS["budget"], help="density budget of the search (0.3)")
    p.add_argument("--rows-from", type=int, default=DEFAULTS["rows_from"],
                   help="score recall on query rows from this one on (1024)")
    p.add_argument("--candidates", type=_candidates_arg, default=None,
                   help="JSON list of candidate patterns (default: the shipped grid, CANDIDATES)")


def run(model_path: Optional[str], out: str, *, device: str = "cpu", length: int = 4096, seed: int = 0,
        budget: float = 0.3, rows_from: int = 1024, candidates=None) -> tuple:
    """run: ``(fitted MInference, provenance record)`` of the model at ``model_path`` (None: bundled)."""
    from ._common import call_text, load_model

    t0 = time.time()
    cands = list(CANDIDATES if candidates is None else candidates)
    model, tok, _ = load_model(model_path, device=device)
    m = fit_minference(model, tok, length=length, seed=seed, candidates=cands, budget=budget, rows_from=rows_from,
                       out=out)
    types: dict = {}
    for hs in m.plan.values():
        for e in hs.values():
            types[e["type"]] = types.get(e["type"], 0) + 1
    rec = {"call": call_text("minference", dict(length=length, seed=seed, budget=budget, rows_from=rows_from)),
           "candidates": cands, "seconds": round(time.time() - t0, 1),
           "data": f"1 prompt x {length} tokens: first window of sparsattn.train.seer_gate.token_windows(tok, "
                   f"{length}, seed={seed}) over sparsattn.data.source_files('train')",
           "head_types": types}
    return m, rec
