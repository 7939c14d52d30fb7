"""SeerAttention calibration of a model: train the AttnGates on the model's own attention
(SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs, arXiv 2410.13276).

Model-level fitting of ``sparsattn.methods.seer_attention.SeerAttention``: the self-distillation
of ``sparsattn.train.seer_gate`` (``gate_loss``: KL to the block max-pooled attention of the frozen
model, first quarter of query blocks dropped; ``train_gate``'s AdamW + warm-up + cosine loop) on a
stream of ``seq_len``-token sequences, saved as a gate directory that ``SeerAttention.load`` reads.

Data (``--data``): ``retrieval`` (default) mixes passkey prompts over a training-split haystack
(``calibrate._retrieval.retrieval_prompts``, needle at a uniform random depth; a fraction
``retrieval_fraction`` of the steps) with plain training-split source windows, so the gate sees
question rows whose attention peaks on a distant needle block: on source windows alone the
distilled target almost never holds such a block and the gate learns locality and sinks.
``source`` streams source windows only (the repository's recipe on its own corpus). ``--init``
starts from a saved gate directory (fine-tuning) instead of a fresh gate.
``sparsattn calibrate seer_attention`` runs it.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Optional

import torch

from ..methods.seer_attention import SeerAttention
from ._seer_recall import diagnostics, gate_block_recall  # noqa: F401  (gate block recall vs the oracle)

OUT = "seer_gate"
PROVENANCE_KEY = "seer_gate"
DEFAULTS = {"steps": 300, "seq_len": 2048, "minutes": 20.0, "seed": 0, "lr": 1e-3, "rope_input": "pre",
            "data": "retrieval", "retrieval_fraction": 0.75, "init": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The method options of ``sparsattn calibrate seer_attention``."""
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimiser steps (300)")
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="training sequence length (2048)")
    p.add_argument("--minutes", type=float, default=DEFAULTS["minutes"], help="wall-time cap (20)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--rope-input", choices=("pre", "post"), default=DEFAULTS["rope_input"])
    p.add_argument("--data", choices=("retrieval", "source"), default=DEFAULTS["data"],
                   help="retrieval: passkey prompts mixed with source windows (default); source: windows only")
    p.add_argument("--retrieval-fraction", type=float, default=DEFAULTS["retrieval_fraction"],
                   help="share of retrieval prompts with --data retrieval (0.75)")
    p.add_argument("--init", default=DEFAULTS["init"], help="gate directory to start from (default: a fresh gate)")


def sequences(tokenizer, seq_len: int, *, data: str = "retrieval", retrieval_fraction: float = 0.75, seed: int = 0,
              haystack=None, source=None):
    """Endless ``[1, seq_len]`` training sequences: with ``data="retrieval"`` a passkey prompt (random
    depth; ``haystack`` as ``retrieval_prompts``) with probability ``retrieval_fraction``, else a
    source window (``source``: an iterator of windows; default ``token_windows`` of the training split)."""
    from ..train.seer_gate import token_windows
    from ._retrieval import retrieval_prompts

    if data not in ("retrieval", "source"):
        raise ValueError(f"data: expected 'retrieval' or 'source', got {data!r}")
    if not isinstance(retrieval_fraction, (int, float)) or not 0 <= retrieval_fraction <= 1:
        raise ValueError(f"retrieval_fraction: expected a number in [0, 1], got {retrieval_fraction!r}")
    rng = random.Random(seed)
    win = token_windows(tokenizer, seq_len, seed=seed) if source is None else source
    if haystack is None:  # one stream for every prompt (a fresh token_windows re-tokenizes files)
        haystack = token_windows(tokenizer, seq_len, seed=10_000 + seed)
    i = 0
    while True:
        if data == "retrieval" and rng.random() < retrieval_fraction:
            p = retrieval_prompts(tokenizer, seq_len, 1, seed=1000 * seed + i, depths=[rng.random()],
                                  haystack=haystack)[0]
            yield p["ids"]
            i += 1
        else:
            yield next(win)


def train(model, tokenizer, out: str, *, steps: int = 300, seq_len: int = 2048, minutes: Optional[float] = 20.0,
          seed: int = 0, lr: float = 1e-3, rope_input: str = "pre", data: str = "retrieval",
          retrieval_fraction: float = 0.75, init: Optional[str] = None, haystack=None, source=None, log=print):
    """train: distil a gate for ``model`` (fresh, or loaded from ``init``) on ``sequences(...)`` and save
    it to ``out`` -> ``(SeerGate, losses)``."""
    from ..methods.seer_attention import SeerGate
    from ..train.seer_gate import capture_for_gate, gate_for_model, train_gate

    for p in model.parameters():
        p.requires_grad_(False)
    dev = next(model.parameters()).device
    gate = SeerGate.load(init) if init else gate_for_model(model, rope_input=rope_input, seed=seed)
    gate = gate.to(dev).float()
    stream = sequences(tokenizer, seq_len, data=data, retrieval_fraction=retrieval_fraction, seed=seed,
                       haystack=haystack, source=source)

    def batches():
        for ids in stream:
            yield capture_for_gate(model, ids.to(dev), gate.layers)

    t0 = time.time()
    losses = train_gate(gate, batches(), steps=steps, lr=lr, warmup=min(20, steps), minutes=minutes, log=log)
    gate.model_info.update({"steps_done": len(losses), "first_loss": losses[0] if losses else None,
                            "final_loss": losses[-1] if losses else None, "seconds": round(time.time() - t0, 1),
                            "seq_len": seq_len, "steps": steps, "lr": lr, "init": init,
                            "data": data if data == "source" else f"retrieval {retrieval_fraction} + source"})
    gate.save(out, dtype=torch.bfloat16)
    return gate, losses


def run(model_path: Optional[str], out: str, *, device: str = "cpu", steps: int = 300, seq_len: int = 2048,
        minutes: Optional[float] = 20.0, seed: int = 0, lr: float = 1e-3, rope_input: str = "pre",
        data: str = "retrieval", retrieval_fraction: float = 0.75, init: Optional[str] = None) -> tuple:
    """run: ``(SeerAttention with the trained gate, provenance record)`` of the model at ``model_path``
    (None: bundled)."""
    from ._common import call_text, load_model

    t0 = time.time()
    model, tok, _ = load_model(model_path, device=device)
    gate, losses = train(model, tok, out, steps=steps, seq_len=seq_len, minutes=minutes, seed=seed, lr=lr,
                         rope_input=rope_input, data=data, retrieval_fraction=retrieval_fraction, init=init)
    m = SeerAttention.load(str(out))
    what = "sparsattn.data.source_files('train'), token_windows" if data == "source" else (
        f"{retrieval_fraction:.2f} passkey prompts (calibrate._retrieval.retrieval_prompts: training-split source "
        f"haystack, needle at a random depth, seeds 1000 x {seed} + i) + source windows of source_files('train')")
    opts = dict(steps=steps, seq_len=seq_len, minutes=minutes, seed=seed, lr=lr, rope_input=rope_input, data=data,
                retrieval_fraction=retrieval_fraction, device=device)
    if init:
        opts["init"] = init
    rec = {"call": call_text("seer_attention", opts), "seconds": round(time.time() - t0, 1),
           "data": f"{seq_len}-token sequences: {what}", "steps_done": len(losses),
           "first_loss": round(losses[0], 5) if losses else None,
           "final_loss": round(losses[-1], 5) if losses else None,
           "mean_loss_last_20": round(sum(losses[-20:]) / len(losses[-20:]), 5) if losses else None}
    return m, rec
