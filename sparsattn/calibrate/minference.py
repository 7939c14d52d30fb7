"""MInference calibration of a model: the offline kernel-aware search of each head's pattern type
on q/k/v captured from retrieval prompts (MInference 1.0: Accelerating Pre-filling for Long-Context
LLMs via Dynamic Sparse Attention, arXiv 2407.02490).

Model-level fitting of ``sparsattn.methods.minference.MInference``: capture q/k/v of every layer on
``n_prompts`` passkey prompts of ``length`` tokens over a training-split haystack
(``calibrate._retrieval.retrieval_prompts``; the authors run their search on a retrieval task,
InfiniteBench kv_retrieval, per their experiments README) and call ``MInference.fit``
(``search_patterns``) under a density ``budget``, scoring each candidate by the mean of its
attention recall over the rows from ``length // 4`` and over the last 64 rows (the question and
answer, which read the needle). ``--data source`` searches on plain source windows instead (the
earlier shipped plan). ``sparsattn calibrate minference`` runs it; its defaults regenerate the
shipped ``minference.json``.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Optional, Sequence

import torch

from ..methods.minference import MInference

OUT = "minference.json"
PROVENANCE_KEY = "minference"

#: the search grid of the shipped calibration: candidates of about 8-15% density at 4K tokens
#: (vertical-slash sizes count the 30 forced sink columns and 100 local diagonals; the paper's grid
#: is for prompts of 8K tokens and more and budgets near 50%)
CANDIDATES = (
    {"type": "a_shape", "n_init": 64, "n_local": 128},
    {"type": "a_shape", "n_init": 64, "n_local": 192},
    {"type": "vertical_slash", "v_size": 64, "s_size": 100},
    {"type": "vertical_slash", "v_size": 128, "s_size": 100},
    {"type": "vertical_slash", "v_size": 192, "s_size": 100},
    {"type": "vertical_slash", "v_size": 64, "s_size": 101},
    {"type": "block_sparse", "top_k": 3},
    {"type": "block_sparse", "top_k": 4},
)
DEFAULTS = {"length": 4096, "n_prompts": 2, "seed": 0, "budget": 0.15, "data": "retrieval"}


def calibration_ids(tokenizer, data: str, length: int, n_prompts: int, seed: int) -> torch.Tensor:
    """``[n_prompts, length]`` calibration ids: retrieval prompts (``data="retrieval"``) or the first
    windows of ``token_windows(tokenizer, length, seed=seed)`` (``data="source"``)."""
    if data == "retrieval":
        from ._retrieval import retrieval_prompts

        return torch.cat([p["ids"] for p in retrieval_prompts(tokenizer, length, n_prompts, seed=seed)])
    if data == "source":
        from ..train.seer_gate import token_windows

        w = token_windows(tokenizer, length, seed=seed)
        return torch.cat([next(w) for _ in range(n_prompts)])
    raise ValueError(f"data: expected 'retrieval' or 'source', got {data!r}")


def fit_minference(model, tokenizer, *, length: int = 4096, n_prompts: int = 2, seed: int = 0,
                   candidates: Optional[Sequence[dict]] = CANDIDATES, budget: Optional[float] = 0.15,
                   rows_from=None, data: str = "retrieval", ids=None, out=None, **config) -> MInference:
    """fit_minference: search each head's pattern on q/k/v of ``model`` captured on ``ids`` ``[B, T]``
    (default ``calibration_ids(tokenizer, data, length, n_prompts, seed)``) over ``candidates`` under
    ``budget``; ``rows_from`` default ``(T // 4, T - 64)``; ``config``: MInference.fit's other
    options; saved to ``out``."""
    from ..capture import capture_qkv  # lazy: transformers

    if ids is None:
        ids = calibration_ids(tokenizer, data, length, n_prompts, seed)
    T = ids.shape[1]
    rows_from = (T // 4, max(0, T - 64)) if rows_from is None else rows_from
    dev = next(model.parameters()).device
    with torch.no_grad():
        cap = capture_qkv(model, ids.to(dev))
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
    p.add_argument("--length", type=int, default=DEFAULTS["length"], help="tokens of each calibration prompt (4096)")
    p.add_argument("--n-prompts", type=int, default=DEFAULTS["n_prompts"], help="calibration prompts (2)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the calibration prompts (0)")
    p.add_argument("--budget", type=float, default=DEFAULTS["budget"], help="density budget per head (0.15)")
    p.add_argument("--data", choices=("retrieval", "source"), default=DEFAULTS["data"],
                   help="retrieval: passkey prompts over training-split source (default); source: plain windows")
    p.add_argument("--candidates", type=_candidates_arg, default=None,
                   help="JSON list of candidate patterns (default: the shipped grid, CANDIDATES)")


def run(model_path: Optional[str], out: str, *, device: str = "cpu", length: int = 4096, n_prompts: int = 2,
        seed: int = 0, budget: float = 0.15, data: str = "retrieval", candidates=None) -> tuple:
    """run: ``(fitted MInference, provenance record)`` of the model at ``model_path`` (None: bundled)."""
    from ._common import call_text, load_model

    t0 = time.time()
    cands = list(CANDIDATES if candidates is None else candidates)
    model, tok, _ = load_model(model_path, device=device)
    m = fit_minference(model, tok, length=length, n_prompts=n_prompts, seed=seed, candidates=cands, budget=budget,
                       data=data, out=out)
    types: dict = {}
    dens = []
    for hs in m.plan.values():
        for e in hs.values():
            types[e["type"]] = types.get(e["type"], 0) + 1
            dens.append(e["density"])
    what = ("passkey prompts (calibrate._retrieval.retrieval_prompts: RULER niah_single template, 7-digit value "
            f"at depths linspace(0, 1, {n_prompts}), haystack = token_windows over source_files('train'), "
            f"seed {seed})") if data == "retrieval" else \
        f"first windows of token_windows(tok, {length}, seed={seed}) over source_files('train')"
    rec = {"call": call_text("minference", dict(length=length, n_prompts=n_prompts, seed=seed, budget=budget,
                                                data=data)),
           "candidates": cands, "seconds": round(time.time() - t0, 1),
           "data": f"{n_prompts} prompt(s) x {length} tokens: {what}",
           "rows_from": [length // 4, length - 64], "head_types": types,
           "mean_density_at_calibration": round(sum(dens) / len(dens), 4)}
    return m, rec
