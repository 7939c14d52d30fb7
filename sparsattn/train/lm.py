"""Train the bundled long-context model: a small Llama decoder on local code + synthetic retrieval.

Recipe (defaults; every knob is a flag):

* Model: ``LlamaForCausalLM``, hidden 512, 8 layers, 8 query / 2 KV heads (GQA) of 64, SwiGLU 1216,
  RoPE theta 5e5, max_position_embeddings 16384, tied embeddings, vocab 8192: 24.4M parameters.
* Tokenizer: byte-level BPE with single-digit pre-tokens, trained on ~16 MB of the corpus.
* Data: the train split of the installation's Python files, packed with ``</s>`` separators, plus
  synthetic retrieval samples in the evaluation's exact format (``sparsattn.train.data``).
  Loss = mean CE over code tokens + ``answer_weight`` x mean CE over retrieval-answer tokens
  (separately averaged so the few answer tokens are not drowned).
* Curriculum over *wall-clock time* (robust to unknown throughput): 1K, 2K, 4K, 8K, 16K tokens,
  ~128K tokens per step, retrieval share rising from 30% to 50%; AdamW (fused on CUDA), linear
  warm-up then cosine decay on the time fraction; bf16 autocast, SDPA flash/cuDNN attention.
  ``--steps N`` switches to a step-based schedule (tests, dry runs).
* Checkpoints (HF format, safetensors shards <= 14 MB) after every phase and at the end, then a
  dense pass-key self-check (greedy, string match) and a quick held-out loss; metrics.json and
  the model card README.md are written next to the weights.

Run: ``python -m sparsattn.train.lm --out DIR --minutes 9 --device cuda`` (``--tiny`` for a
seconds-long CPU smoke run). The time budget covers everything from process start.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .checkpoint import count_parameters, model_config, save_checkpoint  # noqa: F401  (public names of lm)
from .lm_config import (DEFAULT_CURRICULUM, MAX_SHARD_BYTES, SHARD_SIZE, TINY_CURRICULUM, Phase,  # noqa: F401
                        TrainConfig, build_parser, config_from_args, parse_curriculum, selfcheck_lengths,
                        validate_config)


def _process_start() -> float:
    """time.monotonic() value at which this process started (Linux /proc), else now."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19]) / ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.monotonic() - max(0.0, uptime - start)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


_T_START = _process_start()

# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

class _Log:
    def __init__(self, path: Path, t0: float):
        self.path, self.t0 = path, t0
        self.f = open(path, "a", buffering=1)

    def __call__(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")

    def close(self):
        self.f.close()


def _environment(device) -> dict:
    """The run's environment record (``sparsattn._environment.environment``, the library's one format)
    plus the tokenizers version the data was tokenized with."""
    import tokenizers

    from .._environment import environment

    env = environment(device)
    env["tokenizers"] = tokenizers.__version__
    return env


def _lr_at(cfg: TrainConfig, step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from lr to lr * min_lr_ratio over progress 0..1."""
    w = min(1.0, (step + 1) / max(1, warmup))
    p = min(max(progress, 0.0), 1.0)
    decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return cfg.lr * w * decay


def _loader(corpus, tokenizer_json: str, phase: Phase, batch_size: int, cfg: TrainConfig, phase_idx: int,
            bos_id: int, eos_id: int, pin: bool):
    import torch

    from .data import BatchStream

    ds = BatchStream(corpus, tokenizer_json, seq_len=phase.seq_len, batch_size=batch_size,
                     retrieval_share=phase.retrieval_share, seed=cfg.seed * 1000 + phase_idx, bos_id=bos_id,
                     eos_id=eos_id)
    kw = {}
    if cfg.workers > 0:
        import multiprocessing as mp
        kw = dict(num_workers=cfg.workers, prefetch_factor=4, multiprocessing_context=mp.get_context("fork"),
                  persistent_workers=False)
    return torch.utils.data.DataLoader(ds, batch_size=None, pin_memory=pin, **kw)


def _sdpa_context(device):
    """On CUDA: SDPA restricted to flash / cuDNN / memory-efficient kernels (never the quadratic math path)."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


class _Trainer:
    """Holds model/optimizer and runs one optimizer step with micro-batching and OOM back-off."""

    def __init__(self, model, opt, cfg: TrainConfig, device, log):
        import torch

        self.model, self.opt, self.cfg, self.device, self.log = model, opt, cfg, device, log
        self.amp = device.type == "cuda"
        self.restrict_sdpa = device.type == "cuda"
        self.vocab = model.config.vocab_size
        z = lambda: torch.zeros((), device=device, dtype=torch.float32)  # noqa: E731
        self.sums = {"lm": z(), "n_lm": z(), "ans": z(), "n_ans": z(), "ans_hit": z()}

    def reset_stats(self):
        for v in self.sums.values():
            v.zero_()

    def stats(self) -> dict:
        s = {k: float(v) for k, v in self.sums.items()}
        return {"lm_loss": s["lm"] / max(s["n_lm"], 1.0), "answer_loss": s["ans"] / max(s["n_ans"], 1.0),
                "answer_acc": s["ans_hit"] / max(s["n_ans"], 1.0), "n_answer_tokens": s["n_ans"]}

    def _forward_loss(self, inp, tgt, grp, n_lm, n_ans):
        import torch
        import torch.nn.functional as F

        import contextlib

        ctx = _sdpa_context(self.device) if self.restrict_sdpa else contextlib.nullcontext()
        with ctx, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            hidden = self.model.model(input_ids=inp).last_hidden_state
            logits = self.model.lm_head(hidden)
        ce = F.cross_entropy(logits.float().reshape(-1, self.vocab), tgt.reshape(-1), reduction="none").view_as(tgt)
        lm_m = (grp == 1).float()
        ans_m = (grp == 2).float()
        lm_sum = (ce * lm_m).sum()
        ans_sum = (ce * ans_m).sum()
        loss = lm_sum / n_lm + self.cfg.answer_weight * ans_sum / n_ans
        with torch.no_grad():
            hit = ((logits.argmax(-1) == tgt).float() * ans_m).sum()
            self.sums["lm"] += lm_sum.detach()
            self.sums["n_lm"] += lm_m.sum()
            self.sums["ans"] += ans_sum.detach()
            self.sums["n_ans"] += ans_m.sum()
            self.sums["ans_hit"] += hit
        return loss

    def step(self, batch: dict, lr: float, micro: int) -> int:
        """One optimizer step over ``batch``; returns the micro-batch size that worked."""
        import torch

        tokens = batch["tokens"].to(self.device, non_blocking=True).long()
        groups = batch["groups"].to(self.device, non_blocking=True)
        inp, tgt, grp = tokens[:, :-1], tokens[:, 1:], groups[:, 1:]
        n_lm = (grp == 1).sum().float().clamp_min(1.0)
        n_ans = (grp == 2).sum().float().clamp_min(1.0)
        for g in self.opt.param_groups:
            g["lr"] = lr
        B = tokens.shape[0]
        micro = max(1, min(micro, B))
        while True:
            snapshot = {k: v.clone() for k, v in self.sums.items()}
            try:
                for i in range(0, B, micro):
                    loss = self._forward_loss(inp[i:i + micro], tgt[i:i + micro], grp[i:i + micro], n_lm, n_ans)
                    loss.backward()
                break
            except torch.cuda.OutOfMemoryError:
                self.opt.zero_grad(set_to_none=True)
                self.sums = snapshot
                loss = None
                if micro == 1:
                    raise
                torch.cuda.empty_cache()
                micro = max(1, micro // 2)
                self.log(f"out of memory at {B}x{inp.shape[1]}: micro-batch -> {micro}")
            except RuntimeError as e:
                # no flash/cuDNN/efficient kernel for these inputs: allow every SDPA backend once
                if self.restrict_sdpa and "No available kernel" in str(e):
                    self.opt.zero_grad(set_to_none=True)
                    self.sums = snapshot
                    self.restrict_sdpa = False
                    self.log(f"SDPA: no fused kernel ({str(e).splitlines()[0][:120]}); allowing all backends")
                    continue
                raise
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return micro


def _heldout_loss(model, tokenizer, files_future, device, lengths: list[int], log) -> dict:
    """Quick held-out LM loss (nats/token) on a few windows of held-out files per length.

    ``files_future``: a future of ``source_files("heldout")`` (scanned in a thread during training).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .data import Corpus, raw_tokenizer

    try:
        files = files_future.result()
    except ValueError as e:
        log(f"held-out loss skipped: {e}")
        return {}
    raw = raw_tokenizer(tokenizer)
    corpus = Corpus.build(raw, files, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                          max_bytes=int(3e6), seed=1)
    out = {}
    rng = np.random.default_rng(123)
    model.eval()
    for L in lengths:
        if L + 1 > len(corpus):
            continue
        n = max(1, min(16, (2 * 2048 * 16) // L))
        wins = torch.from_numpy(np.stack([corpus.window(rng, L + 1) for _ in range(n)])).long()
        tot, cnt = 0.0, 0
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for i in range(0, n, 4):
                w = wins[i:i + 4].to(device)
                logits = model(input_ids=w[:, :-1]).logits.float()
                tgt = w[:, 1:]
                mask = tgt != tokenizer.bos_token_id
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
                tot += float((ce * mask.reshape(-1)).sum())
                cnt += int(mask.sum())
        out[str(L)] = {"loss": tot / max(cnt, 1), "perplexity": math.exp(min(tot / max(cnt, 1), 50.0)),
                       "tokens": cnt}
    model.train()
    return out


def passkey_selfcheck(model, tokenizer, lengths: list[int], n: int, device, *, seed: int = 1234,
                      new_tokens: int = 10) -> dict:
    """passkey_selfcheck: dense pass-key accuracy by length and depth (greedy decode, string match).

    Prompts: the evaluation's passkey format in the noise haystack (built by
    ``RetrievalTasks.needle``, identical tokenization to ``sparsattn.eval.tasks.passkey``), with
    depths evenly spaced over [0, 1]; the prompt plus the answer fits in ``length`` tokens.
    """
    import numpy as np
    import torch

    from .data import Corpus, RetrievalTasks, raw_tokenizer

    raw = raw_tokenizer(tokenizer)
    dummy = Corpus(np.array([tokenizer.bos_token_id] * 8, dtype=np.int32))
    tasks = RetrievalTasks(raw, dummy, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    model.eval()
    res = {}
    for L in lengths:
        rng = random.Random(seed + L)
        nprng = np.random.default_rng(seed + L)
        by_depth: dict[str, list[int]] = {}
        hits = 0
        for i in range(n):
            depth = i / (n - 1) if n > 1 else 0.5
            s = tasks.needle(rng, nprng, L - new_tokens - 2, haystack="noise", n_needles=1, depths=[depth],
                             key_kind="words", pad_front=False)
            ids = torch.from_numpy(s.ids[s.prompt_start:s.prompt_end].astype(np.int64))[None].to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
            text = tokenizer.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
            ok = int(s.answers[0] in text)
            hits += ok
            by_depth.setdefault(f"{depth:.2f}", []).append(ok)
        res[str(L)] = {"acc": hits / n, "n": n, "by_depth": {d: sum(v) / len(v) for d, v in by_depth.items()}}
    model.train()
    return res


def train(cfg: TrainConfig, *, start_time: float | None = None) -> dict:
    """train: run the whole recipe; returns the metrics dict (also written to ``out/metrics.json``).

    ``start_time``: ``time.monotonic()`` origin of the ``minutes`` budget (default: now; the
    ``python -m`` entry point passes the process start, so imports count too).
    """
    validate_config(cfg)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    from ..data import source_files
    from .card import write_card
    from .data import Corpus, DEFAULT_MIX, raw_tokenizer
    from .tokenizer import load_tokenizer, sample_texts, save_tokenizer, train_tokenizer

    t_start = time.monotonic() if start_time is None else float(start_time)
    deadline = t_start + cfg.minutes * 60.0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "train_log.txt", t_start)
    device = torch.device(cfg.device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = _environment(device)
    log(f"start: {env}")
    log(f"config: {json.dumps(asdict(cfg))}")

    # ---------------------------------------------------------------- data
    t = time.monotonic()
    roots = [Path(r) for r in cfg.corpus_root] or None
    files = source_files("train", roots=roots)
    log(f"corpus: {len(files)} train files ({time.monotonic() - t:.1f}s)")
    t = time.monotonic()
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
        tok_source = f"loaded from {cfg.tokenizer}"
    else:
        tokenizer = train_tokenizer(sample_texts(files, int(cfg.tokenizer_mb * 1e6), seed=cfg.seed), cfg.vocab_size)
        tok_source = f"trained on {cfg.tokenizer_mb} MB of train files"
    save_tokenizer(tokenizer, out)
    raw = raw_tokenizer(tokenizer)
    vocab = raw.get_vocab_size()
    log(f"tokenizer: vocab {vocab}, {tok_source} ({time.monotonic() - t:.1f}s)")
    t = time.monotonic()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    corpus = Corpus.build(raw, files, bos_id=bos, eos_id=eos, max_bytes=int(cfg.corpus_mb * 1e6), seed=cfg.seed)
    log(f"corpus: {len(corpus):,} tokens from {corpus.n_docs} files, {corpus.n_bytes / 1e6:.1f} MB "
        f"({corpus.n_bytes / max(len(corpus), 1):.2f} chars/token, {time.monotonic() - t:.1f}s)")
    tokenizer_json = raw.to_str()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before forking loader workers

    # ---------------------------------------------------------------- model
    conf = model_config(cfg, vocab_size=vocab, bos_id=bos, eos_id=eos, pad_id=pad)
    model = LlamaForCausalLM(conf).to(device)
    model.config._attn_implementation = "sdpa"
    n_params = count_parameters(model)
    log(f"model: {n_params:,} parameters ({n_params / 1e6:.2f}M), {conf.num_hidden_layers} layers, "
        f"hidden {conf.hidden_size}, heads {conf.num_attention_heads}/{conf.num_key_value_heads}")
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt_kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if device.type == "cuda":
        opt_kw["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kw)
    if cfg.compile:
        model.model.compile(dynamic=False)
        log("torch.compile: decoder compiled (dynamic=False, one graph per sequence length)")
    trainer = _Trainer(model, opt, cfg, device, log)

    recipe = {
        "model": {"architecture": "LlamaForCausalLM", "n_params": n_params, "vocab_size": vocab,
                  "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
                  "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                  "intermediate_size": cfg.intermediate, "rope_theta": cfg.rope_theta,
                  "max_position_embeddings": cfg.max_position, "tie_word_embeddings": True,
                  "trained_length": max(p.seq_len for p in cfg.phases()), "saved_dtype": cfg.save_dtype},
        "tokenizer": f"byte-level BPE, single-digit pre-tokens, vocab {vocab}, {tok_source}",
        "curriculum (len:time-or-step share:retrieval share)": cfg.curriculum,
        "schedule": "step-based" if cfg.steps else "wall-clock based",
        "tokens_per_step": cfg.tokens_per_step, "optimizer": "AdamW" + (" (fused)" if device.type == "cuda" else ""),
        "lr": cfg.lr, "min_lr_ratio": cfg.min_lr_ratio, "warmup_steps": cfg.warmup_steps,
        "lr_schedule": "linear warm-up, cosine decay over the run", "betas": [cfg.beta1, cfg.beta2],
        "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip, "answer_weight": cfg.answer_weight,
        "loss": "mean CE on code tokens + answer_weight x mean CE on retrieval answers",
        "precision": "bf16 autocast, fp32 master weights" if device.type == "cuda" else "fp32",
        "attention": "SDPA (flash / cuDNN / efficient)", "compile": cfg.compile, "seed": cfg.seed,
        "data": {"corpus": "train split of the installation's .py files (sparsattn.data.source_files)",
                 "files": len(files), "corpus_tokens": len(corpus), "corpus_chars": corpus.n_bytes,
                 "synthetic_mix": DEFAULT_MIX, "minutes_budget": cfg.minutes},
    }
    metrics = {"recipe": recipe, "training": {}, "environment": env, "selfcheck": {}, "eval": {}}

    # held-out files for the final quick check: scanned in a thread while the GPU trains
    import concurrent.futures
    pool = concurrent.futures.ThreadPoolExecutor(1)
    heldout_files = pool.submit(source_files, "heldout", roots=roots)
    pool.shutdown(wait=False)

    # ---------------------------------------------------------------- schedule
    phases = cfg.phases()
    train_t0 = time.monotonic()
    train_t1 = deadline - cfg.reserve_seconds
    prep_s = train_t0 - t_start
    if not cfg.steps and train_t1 - train_t0 < 5:
        raise ValueError(f"minutes: budget too small: {prep_s:.0f}s of preparation leave "
                         f"{train_t1 - train_t0:.0f}s of training")
    cum = np.cumsum([p.frac for p in phases])
    if cfg.steps:  # phase i ends at step round(cum_i * steps), at least one step per phase
        step_ends = []
        for c in cum:
            step_ends.append(max(int(round(c * cfg.steps)), (step_ends[-1] if step_ends else 0) + 1))
        total_steps = step_ends[-1]
    log(f"prep {prep_s:.1f}s; training budget {train_t1 - train_t0:.1f}s" if not cfg.steps else
        f"prep {prep_s:.1f}s; training {total_steps} steps")

    step, tokens_seen = 0, 0
    phase_log = []
    stopped_early = False
    pin = device.type == "cuda"
    last = {}
    for pi, ph in enumerate(phases):
        B = max(1, cfg.tokens_per_step // ph.seq_len)
        micro = min(B, cfg.micro_batch or B)
        loader = _loader(corpus, tokenizer_json, ph, B, cfg, pi, bos, eos, pin)
        it = iter(loader)
        ph_t0, ph_step0, ph_tok0 = time.monotonic(), step, tokens_seen
        phase_end_t = train_t0 + cum[pi] * (train_t1 - train_t0)
        log(f"phase {pi + 1}/{len(phases)}: seq_len {ph.seq_len}, batch {B}, retrieval share {ph.retrieval_share}")
        trainer.reset_stats()
        t_log, tok_log = time.monotonic(), tokens_seen
        while True:
            now = time.monotonic()
            if cfg.steps:
                if step >= step_ends[pi]:
                    break
                progress = step / total_steps
            else:
                if now >= phase_end_t and step > ph_step0:
                    break
                if now >= train_t1:
                    break
                progress = (now - train_t0) / (train_t1 - train_t0)
            lr = _lr_at(cfg, step, progress, cfg.warmup_steps)
            batch = next(it)
            micro = trainer.step(batch, lr, micro)
            step += 1
            tokens_seen += B * ph.seq_len
            if step % cfg.log_every == 0:
                st = trainer.stats()
                dt = time.monotonic() - t_log
                tps = (tokens_seen - tok_log) / max(dt, 1e-9)
                log(f"step {step} len {ph.seq_len} lr {lr:.2e} lm {st['lm_loss']:.4f} ans {st['answer_loss']:.4f} "
                    f"ans_acc {st['answer_acc']:.3f} tok/s {tps:,.0f} tokens {tokens_seen:,} "
                    f"elapsed {time.monotonic() - t_start:.1f}s")
                if not math.isfinite(st["lm_loss"]) or not math.isfinite(st["answer_loss"]):
                    raise FloatingPointError(f"non-finite loss at step {step}: {st}")
                last = st
                trainer.reset_stats()
                t_log, tok_log = time.monotonic(), tokens_seen
        if trainer.sums["n_lm"].item() > 0 or trainer.sums["n_ans"].item() > 0:
            last = trainer.stats()
        del it, loader
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.monotonic() - ph_t0
        entry = {"seq_len": ph.seq_len, "batch": B, "micro_batch": micro, "steps": step - ph_step0,
                 "tokens": tokens_seen - ph_tok0, "seconds": round(sec, 2),
                 "tokens_per_s": round((tokens_seen - ph_tok0) / max(sec, 1e-9)),
                 "retrieval_share": ph.retrieval_share, "lm_loss": last.get("lm_loss"),
                 "answer_loss": last.get("answer_loss"), "answer_acc": last.get("answer_acc")}
        if device.type == "cuda":
            entry["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        phase_log.append(entry)
        log(f"phase {pi + 1} done: {entry}")
        if not cfg.steps and time.monotonic() >= train_t1 and pi < len(phases) - 1:
            stopped_early = True
            log("time budget reached before the last phase")
            break
        if cfg.mid_checkpoints and pi < len(phases) - 1:
            t = time.monotonic()
            metrics["training"] = {"steps": step, "tokens_seen": tokens_seen, "phases": phase_log, "partial": True}
            save_checkpoint(model, tokenizer, out, dtype=cfg.save_dtype)
            write_card(out, metrics)
            log(f"mid-run checkpoint saved ({time.monotonic() - t:.1f}s)")

    train_s = time.monotonic() - train_t0
    metrics["training"] = {
        "steps": step, "tokens_seen": tokens_seen, "train_seconds": round(train_s, 1), "prep_seconds": round(prep_s, 1),
        "final_lm_loss": last.get("lm_loss"), "final_answer_loss": last.get("answer_loss"),
        "final_answer_acc": last.get("answer_acc"), "phases": phase_log, "stopped_early": stopped_early,
    }
    # ---------------------------------------------------------------- save + checks
    t = time.monotonic()
    shards = save_checkpoint(model, tokenizer, out, dtype=cfg.save_dtype)
    log(f"checkpoint: {[f'{p.name} {p.stat().st_size / 2**20:.2f} MiB' for p in shards]} ({time.monotonic() - t:.1f}s)")
    metrics["training"]["checkpoint_shards"] = len(shards)
    metrics["selfcheck"]["reload"] = _reload_check(model, out, cfg, device)
    log(f"reload check: {metrics['selfcheck']['reload']}")
    if metrics["selfcheck"]["reload"]["weights_max_abs_diff"] != 0.0:
        raise RuntimeError(f"save_checkpoint: reloaded weights differ from the trained ones: {metrics['selfcheck']['reload']}")
    lengths = selfcheck_lengths(cfg)
    if lengths:
        t = time.monotonic()
        pk = passkey_selfcheck(model, tokenizer, lengths, cfg.selfcheck_samples, device, seed=cfg.seed + 99)
        metrics["selfcheck"]["passkey"] = pk
        log(f"passkey self-check ({time.monotonic() - t:.1f}s): "
            + ", ".join(f"{L}: {v['acc'] * 100:.0f}%" for L, v in pk.items()))
        t = time.monotonic()
        hl = _heldout_loss(model, tokenizer, heldout_files, device, sorted({min(lengths), max(lengths)}), log)
        if hl:
            metrics["selfcheck"]["heldout_quick"] = hl
            log(f"held-out quick loss ({time.monotonic() - t:.1f}s): "
                + ", ".join(f"{L}: {v['loss']:.3f} (ppl {v['perplexity']:.2f})" for L, v in hl.items()))
    metrics["training"]["total_seconds"] = round(time.monotonic() - t_start, 1)
    write_card(out, metrics)
    log(f"done in {metrics['training']['total_seconds']}s: {out}")
    log.close()
    return metrics


def _reload_check(model, out: Path, cfg: TrainConfig, device) -> dict:
    """Reload the saved folder offline (``AutoModelForCausalLM.from_pretrained``) on the CPU.

    Returns ``weights_max_abs_diff`` (saved vs live weights cast to the saved dtype: expected 0)
    and ``logits_max_abs_diff_vs_live`` (reloaded model vs the live fp32 weights on the CPU, an
    indication of the saved dtype's rounding; 0 for float32).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = getattr(torch, cfg.save_dtype)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=dtype).eval()
    live = {k.replace("_orig_mod.", ""): v.detach().cpu() for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    w_diff = max(float((got[k].float() - v.to(dtype).float()).abs().max()) for k, v in live.items())
    with torch.device("cpu"):
        ref = LlamaForCausalLM(model.config)
    ref.load_state_dict(live)
    ref = ref.float().eval()
    ids = torch.arange(64).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        a = loaded.float()(input_ids=ids).logits
        b = ref(input_ids=ids).logits
    return {"weights_max_abs_diff": w_diff, "logits_max_abs_diff_vs_live": float((a - b).abs().max())}


def main(argv=None, *, start_time: float | None = None) -> int:
    """main: ``python -m sparsattn.train.lm`` entry point; returns the exit code.

    ``start_time``: origin of the ``--minutes`` budget (``time.monotonic()``; default: now).
    """
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    m = train(cfg, start_time=start_time)
    pk = m.get("selfcheck", {}).get("passkey", {})
    print(json.dumps({"out": cfg.out, "steps": m["training"]["steps"], "tokens_seen": m["training"]["tokens_seen"],
                      "final_lm_loss": m["training"]["final_lm_loss"],
                      "passkey": {L: v["acc"] for L, v in pk.items()}}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main(start_time=_T_START))
