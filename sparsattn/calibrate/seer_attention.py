"""SeerAttention calibration of a model: train the AttnGates on the model's own attention
(SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs, arXiv 2410.13276).

Model-level fitting of ``sparsattn.methods.seer_attention.SeerAttention``: the self-distillation
training of ``sparsattn.train.seer_gate.train_gates`` (gates learn the block max-pooled attention
of the frozen model on local text), saved as a gate directory that ``SeerAttention.load`` reads.
``sparsattn calibrate seer_attention`` runs it.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

from ..methods.seer_attention import SeerAttention

OUT = "seer_gate"
PROVENANCE_KEY = "seer_gate"
DEFAULTS = {"steps": 80, "seq_len": 2048, "minutes": 4.0, "seed": 0, "lr": 1e-3, "rope_input": "pre"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The method options of ``sparsattn calibrate seer_attention``."""
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimiser steps (80)")
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="training sequence length (2048)")
    p.add_argument("--minutes", type=float, default=DEFAULTS["minutes"], help="wall-time cap (4)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--rope-input", choices=("pre", "post"), default=DEFAULTS["rope_input"])


def run(model_path: Optional[str], out: str, *, device: str = "cpu", steps: int = 80, seq_len: int = 2048,
        minutes: Optional[float] = 4.0, seed: int = 0, lr: float = 1e-3, rope_input: str = "pre") -> tuple:
    """run: ``(SeerAttention with the trained gate, provenance record)`` of the model at ``model_path``
    (None: bundled)."""
    from ..models import bundled_path
    from ..train.seer_gate import train_gates  # lazy: transformers
    from ._common import call_text

    t0 = time.time()
    path = str(bundled_path() if model_path is None else model_path)
    gdir = train_gates(path, out, steps=steps, seq_len=seq_len, device=device, minutes=minutes, seed=seed, lr=lr,
                       rope_input=rope_input)
    m = SeerAttention.load(str(gdir))
    info = m.gate.model_info
    rec = {"call": call_text("seer_attention", dict(steps=steps, seq_len=seq_len, minutes=minutes, seed=seed, lr=lr,
                                                     rope_input=rope_input, device=device)),
           "seconds": round(time.time() - t0, 1), "data": f"sparsattn.data.source_files('train'), {seq_len}-token windows",
           "steps_done": info.get("steps_done"), "first_loss": info.get("first_loss"),
           "final_loss": info.get("final_loss")}
    return m, rec
