"""Double Sparsity calibration of a model: outlier channels per layer and KV head from q/k
captured on local text (Post-Training Sparse Attention with Double Sparsity, arXiv 2408.07092).

Model-level fitting of ``sparsattn.methods.double_sparsity.DoubleSparsity``: capture q/k of every
layer on one ``length``-token window of the training-split source files and call
``DoubleSparsity.fit``. ``sparsattn calibrate double_sparsity`` runs it.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

from ..methods.double_sparsity import DoubleSparsity

OUT = "double_sparsity.json"
PROVENANCE_KEY = "double_sparsity"
DEFAULTS = {"length": 2048, "seed": 0, "group_factor": 8}


def fit_double_sparsity(model, tokenizer, *, length: int = 2048, seed: int = 0, ids=None, out=None,
                        **config) -> DoubleSparsity:
    """fit_double_sparsity: rank channels on q/k of ``model`` captured on ``ids`` ``[1, T]`` (default:
    the first ``length``-token window of ``token_windows(tokenizer, length, seed=seed)``);
    ``config``: DoubleSparsity's hyper-parameters (``group_factor``: D / r); saved to ``out`` when given."""
    from ..capture import capture_qkv  # lazy: transformers
    from ..train.seer_gate import token_windows

    if ids is None:
        ids = next(token_windows(tokenizer, length, seed=seed))
    cap = capture_qkv(model, ids.to(next(model.parameters()).device))
    return DoubleSparsity.fit(cap, path=out, **config)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The method options of ``sparsattn calibrate double_sparsity``."""
    p.add_argument("--length", type=int, default=DEFAULTS["length"], help="tokens of the calibration window (2048)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="shuffle seed of the training files (0)")
    p.add_argument("--group-factor", type=int, default=DEFAULTS["group_factor"],
                   help="channels per KV head = head_dim / group_factor (8)")


def run(model_path: Optional[str], out: str, *, device: str = "cpu", length: int = 2048, seed: int = 0,
        group_factor: int = 8) -> tuple:
    """run: ``(fitted DoubleSparsity, provenance record)`` of the model at ``model_path`` (None: bundled)."""
    from ._common import call_text, load_model

    t0 = time.time()
    model, tok, _ = load_model(model_path, device=device)
    m = fit_double_sparsity(model, tok, length=length, seed=seed, out=out, group_factor=group_factor)
    rec = {"call": call_text("double_sparsity", dict(length=length, seed=seed, group_factor=group_factor)),
           "seconds": round(time.time() - t0, 1),
           "data": f"1 window x {length} tokens: first window of sparsattn.train.seer_gate.token_windows(tok, "
                   f"{length}, seed={seed}) over sparsattn.data.source_files('train')"}
    return m, rec
