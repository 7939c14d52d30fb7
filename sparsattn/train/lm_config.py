"""The bundled model's training configuration: curriculum phases, ``TrainConfig``, its command line
and validation (``sparsattn.train.lm`` trains with it)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

DEFAULT_CURRICULUM = "1024:0.12:0.3,2048:0.28:0.3,4096:0.20:0.4,8192:0.20:0.45,16384:0.20:0.5"
TINY_CURRICULUM = "256:0.5:0.4,512:0.5:0.5"
MAX_SHARD_BYTES = 15 * 1024 * 1024
SHARD_SIZE = "14MB"


@dataclass
class Phase:
    """One curriculum phase: sequence length, share of the budget (time or steps), retrieval share."""
    seq_len: int
    frac: float
    retrieval_share: float


def parse_curriculum(spec: str) -> list[Phase]:
    """parse_curriculum: ``"L:frac:share,..."`` -> phases (fractions normalised to sum 1).

    Raises:
        ValueError: malformed spec, non-positive length/fraction or share outside [0, 1].
    """
    phases = []
    for part in str(spec).split(","):
        bits = part.strip().split(":")
        if len(bits) not in (2, 3):
            raise ValueError(f"curriculum: expected 'LEN:FRAC[:SHARE],...', got {spec!r}")
        try:
            L, frac = int(bits[0]), float(bits[1])
            share = float(bits[2]) if len(bits) == 3 else 0.35
        except ValueError:
            raise ValueError(f"curriculum: expected numbers in {part!r}") from None
        if L < 64 or frac <= 0 or not 0.0 <= share <= 1.0:
            raise ValueError(f"curriculum: need LEN >= 64, FRAC > 0, 0 <= SHARE <= 1, got {part!r}")
        phases.append(Phase(L, frac, share))
    total = sum(p.frac for p in phases)
    return [Phase(p.seq_len, p.frac / total, p.retrieval_share) for p in phases]


@dataclass
class TrainConfig:
    """TrainConfig: every setting of a run (the argparse flags, resolved)."""
    out: str
    minutes: float = 9.0
    device: str = "cuda"
    tiny: bool = False
    seed: int = 0
    steps: int | None = None
    tokens_per_step: int = 131072
    curriculum: str = DEFAULT_CURRICULUM
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 150
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    answer_weight: float = 1.0
    vocab_size: int = 8192
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 1216
    rope_theta: float = 500000.0
    max_position: int = 16384
    workers: int = 8
    corpus_mb: float = 256.0
    tokenizer_mb: float = 16.0
    tokenizer: str | None = None
    corpus_root: list = field(default_factory=list)
    compile: bool = False
    save_dtype: str = "bfloat16"
    selfcheck_lengths: str = "2048,8192,16384"
    selfcheck_samples: int = 20
    reserve_seconds: float = 45.0
    log_every: int = 20
    mid_checkpoints: bool = True
    micro_batch: int | None = None

    def phases(self) -> list[Phase]:
        return parse_curriculum(self.curriculum)


TINY = dict(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
            max_position=512, tokens_per_step=2048, curriculum=TINY_CURRICULUM, corpus_mb=1.5,
            tokenizer_mb=0.5, selfcheck_lengths="512", selfcheck_samples=4, warmup_steps=5, log_every=2,
            reserve_seconds=10.0, workers=0, lr=3e-3)


def build_parser() -> argparse.ArgumentParser:
    """build_parser: the argparse parser of ``python -m sparsattn.train.lm`` (and ``sparsattn train-lm``)."""
    d = TrainConfig(out="")
    ap = argparse.ArgumentParser(prog="python -m sparsattn.train.lm",
                                 description="Train the bundled long-context Llama model (code + synthetic retrieval).")
    ap.add_argument("--out", required=True, help="checkpoint folder (created)")
    ap.add_argument("--minutes", type=float, default=d.minutes, help="wall-clock budget of the whole run, from process start")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--tiny", action="store_true", help="tiny model and data: a seconds-long CPU smoke run")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--steps", type=int, default=None, help="fixed number of optimizer steps (step-based schedule)")
    ap.add_argument("--tokens-per-step", type=int, default=None, help=f"tokens per optimizer step (default {d.tokens_per_step})")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per forward pass (default: whole step; halves on OOM)")
    ap.add_argument("--curriculum", default=None, help=f"LEN:FRAC:RETRIEVAL_SHARE,... (default {d.curriculum})")
    ap.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr})")
    ap.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    ap.add_argument("--warmup-steps", type=int, default=None, help=f"(default {d.warmup_steps})")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--grad-clip", type=float, default=d.grad_clip)
    ap.add_argument("--answer-weight", type=float, default=d.answer_weight, help="weight of the retrieval-answer loss")
    for name, typ in (("vocab-size", int), ("hidden", int), ("layers", int), ("heads", int), ("kv-heads", int),
                      ("head-dim", int), ("intermediate", int), ("rope-theta", float), ("max-position", int)):
        ap.add_argument(f"--{name}", type=typ, default=None,
                        help=f"(default {getattr(d, name.replace('-', '_'))})")
    ap.add_argument("--workers", type=int, default=None, help="data loader worker processes (default min(8, cpus - 2))")
    ap.add_argument("--corpus-mb", type=float, default=None, help=f"corpus text to tokenize, MB (default {d.corpus_mb})")
    ap.add_argument("--tokenizer-mb", type=float, default=None, help=f"tokenizer training sample, MB (default {d.tokenizer_mb})")
    ap.add_argument("--tokenizer", default=None, help="reuse a saved tokenizer folder instead of training one")
    ap.add_argument("--corpus-root", action="append", default=[], help="scan these folders instead of the installation")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder (one compile per sequence length)")
    ap.add_argument("--save-dtype", choices=["bfloat16", "float32"], default=d.save_dtype)
    ap.add_argument("--selfcheck-lengths", default=None, help=f"comma-separated (default {d.selfcheck_lengths}); '' skips")
    ap.add_argument("--selfcheck-samples", type=int, default=None, help=f"(default {d.selfcheck_samples})")
    ap.add_argument("--reserve-seconds", type=float, default=None, help="time kept for saving and the self-check")
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--no-mid-checkpoints", action="store_true")
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """config_from_args: TrainConfig from parsed flags (``--tiny`` presets first, explicit flags win)."""
    cfg = TrainConfig(out=args.out)
    if args.tiny:
        for k, v in TINY.items():
            setattr(cfg, k, v)
        cfg.tiny = True
    for k in ("minutes", "seed", "steps", "tokens_per_step", "micro_batch", "curriculum", "lr", "min_lr_ratio",
              "warmup_steps", "weight_decay", "grad_clip", "answer_weight", "vocab_size", "hidden", "layers",
              "heads", "kv_heads", "head_dim", "intermediate", "rope_theta", "max_position", "workers",
              "corpus_mb", "tokenizer_mb", "tokenizer", "compile", "save_dtype", "selfcheck_lengths",
              "selfcheck_samples", "reserve_seconds", "log_every"):
        v = getattr(args, k, None)
        if v is not None and v is not False:
            setattr(cfg, k, v)
    cfg.corpus_root = list(args.corpus_root or [])
    cfg.mid_checkpoints = not args.no_mid_checkpoints
    if args.device is None:
        import torch
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        cfg.device = args.device
    if args.workers is None and not args.tiny:
        cfg.workers = max(0, min(8, (os.cpu_count() or 2) - 2))
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """validate_config: ValueError naming the first bad setting."""
    phases = cfg.phases()
    checks = [
        ("minutes", cfg.minutes > 0, "> 0"),
        ("steps", cfg.steps is None or cfg.steps >= len(phases), f">= the number of phases ({len(phases)})"),
        ("heads", cfg.heads % cfg.kv_heads == 0, "a multiple of kv_heads"),
        ("lr", cfg.lr > 0, "> 0"),
        ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        ("answer_weight", cfg.answer_weight >= 0, ">= 0"),
        ("max_position", cfg.max_position >= max(p.seq_len for p in phases), "at least the longest curriculum length"),
        ("tokens_per_step", all(cfg.tokens_per_step >= p.seq_len for p in phases), "at least the longest sequence"),
        ("micro_batch", cfg.micro_batch is None or cfg.micro_batch >= 1, ">= 1"),
        ("selfcheck_samples", cfg.selfcheck_samples >= 1, ">= 1"),
        ("workers", cfg.workers >= 0, ">= 0"),
    ]
    for name, ok, want in checks:
        if not ok:
            raise ValueError(f"{name}: expected {want}, got {getattr(cfg, name)!r}")
    for L in selfcheck_lengths(cfg):
        if L > cfg.max_position:
            raise ValueError(f"selfcheck_lengths: {L} exceeds max_position {cfg.max_position}")


def selfcheck_lengths(cfg: TrainConfig) -> list[int]:
    s = str(cfg.selfcheck_lengths or "").strip()
    return [int(x) for x in s.split(",") if x.strip()] if s else []
