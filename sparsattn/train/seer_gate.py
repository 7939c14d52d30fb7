"""seer_gate: self-distillation training of SeerAttention's AttnGates on a frozen model
(SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs, arXiv 2410.13276).

Target per layer: the block-max-pooled attention map of the frozen model (``kernels.attn_pool``:
per row the max softmax probability in each key block, max over the query block's rows, each row
normalised to 1). Loss: KL(target || gate), i.e. ``kl_div(log_softmax(gate logits), target)``
averaged over all entries (PyTorch ``KLDivLoss`` "mean", as the repository), the first quarter of
query blocks dropped, scaled by ``gate_loss_scale = 10``, summed over layers. AdamW, lr 1e-3,
linear warm-up (20 steps) then cosine decay. Only the gates train; the model stays frozen.

* ``train_gate(gate, batches, steps=...)``: the loop, on any iterator of ``{layer: (q, k)}`` or
  ``{layer: (q, k, q_pre_rope, k_pre_rope)}`` dicts (post-RoPE q/k for the target; the optional
  pre-RoPE pair is what a ``rope_input="pre"`` gate pools), or of ``{layer: gate_features(...)}``.
* ``gate_features`` / ``cached_loss``: the gate's inputs (block-pooled q/k) and target do not
  depend on its weights, so they are captured once per sequence and the loss on them equals
  ``gate_loss`` (value and gradient; ``calibrate.seer_attention.build_cache`` stores them).
  ``row_weight`` and ``target_power`` (``kl_to_target``) are the two departures from the
  repository's loss used by the retrieval calibration; both default to the repository's loss.
* ``train_gates(model_path, out_path, ...)``: loads a local HF causal LM and its tokenizer, streams
  training-split text (``sparsattn.data.source_files("train")``), captures q/k of every layer with
  ``sparsattn.capture.capture_qkv`` (+ q_proj/k_proj hooks for pre-RoPE), trains, saves the gate
  directory (``SeerGate.save``). The entry point is ``sparsattn calibrate seer_attention [--model PATH]
  [--out DIR] [--minutes M]`` (``sparsattn.calibrate.seer_attention``); ``python -m
  sparsattn.train.seer_gate --model PATH --out PATH --minutes M`` is kept for older scripts.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from ..kernels.attn_pool import attn_pool
from ..methods.seer_attention import SeerGate, causal_block_mask

Tensor = torch.Tensor


def kl_to_target(logits: Tensor, target: Tensor, Tq: int, Tk: int, block_size: int, *, loss_scale: float = 10.0,
                 drop_first: float = 0.25, row_weight: Optional[Tensor] = None, target_power: float = 1.0) -> Tensor:
    """kl_to_target: ``loss_scale * mean KL(target || softmax(logits))`` over the query blocks after the
    first ``drop_first`` fraction (entries above the causal diagonal count as 0 in the mean, as
    ``KLDivLoss(reduction="mean")``). ``row_weight`` (optional, ``[nq]`` or ``[B, nq]``) multiplies
    each query block's KL before the mean (all ones = the unweighted loss). ``target_power`` p != 1
    sharpens (p > 1) each target row to ``t^p / sum(t^p)``: the same ranking, with the top blocks'
    lead magnified (a max-pooled row is flat at the top: a needle block at 0.15 against 0.10)."""
    if logits.shape != target.shape:
        raise ValueError(f"target: expected shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    if not (isinstance(target_power, (int, float)) and target_power > 0):
        raise ValueError(f"target_power: expected a positive number, got {target_power!r}")
    n0 = int(logits.shape[2] * drop_first)
    valid = causal_block_mask(Tq, Tk, block_size, logits.device)[n0:]
    logp = torch.log_softmax(logits[:, :, n0:], dim=-1).masked_fill(~valid, 0.0)
    t = target[:, :, n0:].to(logp.dtype)
    if target_power != 1.0:
        t = t.pow(target_power)
        t = t / t.sum(-1, keepdim=True).clamp_min(1e-30)
    kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), torch.zeros_like(t))
    if row_weight is not None:
        w = row_weight.to(kl.dtype)
        w = w[None, None, n0:, None] if w.dim() == 1 else w[:, None, n0:, None]
        kl = kl * w
    return loss_scale * kl.mean()


def _inputs(gate: SeerGate, q: Tensor, k: Tensor, q_pre: Optional[Tensor], k_pre: Optional[Tensor]):
    """What the gate pools: the given pre-RoPE projections for a ``rope_input="pre"`` gate when they are
    at hand, else ``gate.gate_inputs`` of the post-RoPE q/k (RoPE undone for a "pre" gate)."""
    if gate.rope_input == "pre" and q_pre is not None and k_pre is not None:
        return q_pre, k_pre
    return gate.gate_inputs(q, k)


def gate_loss(gate: SeerGate, layer: int, q: Tensor, k: Tensor, q_pre: Optional[Tensor] = None,
              k_pre: Optional[Tensor] = None, *, target: Optional[Tensor] = None, loss_scale: float = 10.0,
              drop_first: float = 0.25, row_weight: Optional[Tensor] = None, target_power: float = 1.0) -> Tensor:
    """gate_loss: ``loss_scale * mean KL(target || softmax(gate))`` over query blocks after the first
    ``drop_first`` fraction. ``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]`` post-RoPE (target);
    ``q_pre``/``k_pre`` the pre-RoPE projections (else RoPE is undone for ``rope_input="pre"``)."""
    if target is None:
        with torch.no_grad():
            target = attn_pool(q, k, block_size=gate.block_size)
    qi, ki = _inputs(gate, q, k, q_pre, k_pre)
    logits = gate.scores(layer, qi, ki, causal=True)
    return kl_to_target(logits, target, q.shape[2], k.shape[2], gate.block_size, loss_scale=loss_scale,
                        drop_first=drop_first, row_weight=row_weight, target_power=target_power)


def gate_features(gate: SeerGate, q: Tensor, k: Tensor, q_pre: Optional[Tensor] = None,
                  k_pre: Optional[Tensor] = None) -> dict:
    """gate_features: what the gate's loss reads of one layer's q/k, cached once per sequence ->
    ``{"q": pooled q [B, Hq, nq, D], "k": pooled k [B, Hkv, nk, 3D], "t": attn_pool target
    [B, Hq, nq, nk], "Tq": int, "Tk": int}`` (the gate's weights never enter: ``cached_loss`` on it
    equals ``gate_loss`` on the q/k, and the cheap cached step replaces a forward of the frozen model)."""
    with torch.no_grad():
        target = attn_pool(q, k, block_size=gate.block_size)
        qpool, kpool = gate.pool(*_inputs(gate, q, k, q_pre, k_pre))
    return {"q": qpool, "k": kpool, "t": target, "Tq": int(q.shape[2]), "Tk": int(k.shape[2])}


def cached_loss(gate: SeerGate, layer: int, feats: dict, *, loss_scale: float = 10.0, drop_first: float = 0.25,
                row_weight: Optional[Tensor] = None, target_power: float = 1.0) -> Tensor:
    """cached_loss: ``gate_loss`` from ``gate_features`` of the same q/k (identical value and gradient)."""
    logits = gate.scores_pooled(layer, feats["q"], feats["k"], feats["Tq"], feats["Tk"], causal=True)
    return kl_to_target(logits, feats["t"], feats["Tq"], feats["Tk"], gate.block_size, loss_scale=loss_scale,
                        drop_first=drop_first, row_weight=row_weight if row_weight is not None else feats.get("w"),
                        target_power=target_power)


def cosine_with_warmup(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def train_gate(gate: SeerGate, batches: Iterable[dict], *, steps: int, lr: float = 1e-3, warmup: int = 20,
               weight_decay: float = 0.0, loss_scale: float = 10.0, drop_first: float = 0.25, target_power: float = 1.0,
               minutes: Optional[float] = None, log: Optional[Callable[[str], None]] = None,
               log_every: int = 10) -> list[float]:
    """train_gate: distil ``gate`` on ``batches`` (``{layer: (q, k[, q_pre, k_pre])}``, or ``{layer:
    gate_features(...)}`` cached, optionally with a row weight ``"w"`` ``[nq]``) for ``steps`` steps (or
    until ``minutes`` run out); returns the per-step losses (summed over layers)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr: expected a positive float, got {lr!r}")
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup: expected an int >= 1, got {warmup!r}")
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ValueError(f"minutes: expected None or a positive number, got {minutes!r}")
    gate.train()
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, steps, warmup))
    t0 = time.time()
    losses: list[float] = []
    it = iter(batches)
    for step in range(steps):
        if minutes is not None and time.time() - t0 > 60 * minutes:
            if log:
                log(f"time limit reached after {step} steps")
            break
        try:
            batch = next(it)
        except StopIteration:
            break
        if not isinstance(batch, dict) or not batch:
            raise ValueError(f"batches: expected non-empty dicts {{layer: (q, k[, q_pre, k_pre])}}, got {type(batch).__name__}")
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for layer, tensors in batch.items():
            if isinstance(tensors, dict):  # cached features (gate_features)
                loss = cached_loss(gate, int(layer), tensors, loss_scale=loss_scale, drop_first=drop_first,
                                   target_power=target_power)
            else:
                loss = gate_loss(gate, int(layer), *tensors, loss_scale=loss_scale, drop_first=drop_first,
                                 target_power=target_power)
            loss.backward()  # per layer: frees each layer's graph before the next
            total += float(loss.detach())
        if not math.isfinite(total):
            raise RuntimeError(f"step {step}: non-finite gate loss {total}")
        opt.step()
        sched.step()
        losses.append(total)
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {total:.5f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f}s")
    gate.eval()
    return losses


# ------------------------------------------------------------------------------------------------
# Real models
# ------------------------------------------------------------------------------------------------


def _cfg_get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def gate_for_model(model, *, hidden_size: int = 128, block_size: int = 64, rope_input: str = "pre",
                   layers=None, seed: int = 0, k_overlap: int = 0) -> SeerGate:
    """gate_for_model: a fresh ``SeerGate`` shaped for an HF causal LM (heads, head_dim, RoPE);
    ``k_overlap``: ``SeerGate``'s key-block overlap (0 = the paper's pooling)."""
    from ..integrations.hf import attention_modules

    cfg = getattr(model, "config", None)
    tcfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    mods = attention_modules(model)
    hq = _cfg_get(tcfg, "num_attention_heads")
    hkv = _cfg_get(tcfg, "num_key_value_heads", default=hq)
    head_dim = _cfg_get(tcfg, "head_dim") or tcfg.hidden_size // hq
    rp = getattr(tcfg, "rope_parameters", None) or {}
    theta = _cfg_get(tcfg, "rope_theta") or (rp.get("rope_theta") if isinstance(rp, dict) else None) or 10000.0
    inv = None
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb") and getattr(mod, "inv_freq", None) is not None:
            if tuple(mod.inv_freq.shape) == (head_dim // 2,):
                inv = mod.inv_freq.detach().float().cpu()
            break
    layers = sorted(mods) if layers is None else sorted(int(x) for x in layers)
    info = {"model_type": getattr(tcfg, "model_type", None), "num_hidden_layers": getattr(tcfg, "num_hidden_layers", None)}
    return SeerGate(int(hq), int(hkv), int(head_dim), layers, hidden_size=hidden_size, block_size=block_size,
                    rope_theta=float(theta), rope_input=rope_input, head_inv_freq=inv, model_info=info, seed=seed,
                    k_overlap=k_overlap)


def capture_for_gate(model, input_ids: Tensor, layers: list[int]) -> dict[int, tuple]:
    """``{layer: (q, k, q_pre_rope, k_pre_rope)}`` of one forward of ``model`` on ``input_ids``."""
    from ..capture import capture_qkv
    from ..integrations.hf import attention_modules

    mods = attention_modules(model)
    pre: dict = {l: {} for l in layers}
    handles = []
    for l in layers:
        m = mods[l]
        if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim"):
            def hook(which, l=l, hd=m.head_dim):
                def fn(mod, args, out):
                    pre[l][which] = out.detach().view(out.shape[0], out.shape[1], -1, hd).transpose(1, 2)
                return fn
            handles += [m.q_proj.register_forward_hook(hook("q")), m.k_proj.register_forward_hook(hook("k"))]
    try:
        cap = capture_qkv(model, input_ids, layers)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for l in layers:
        q, k = cap[l][0], cap[l][1]
        qp, kp = pre[l].get("q"), pre[l].get("k")
        if qp is not None and qp.shape == q.shape and kp is not None and kp.shape == k.shape:
            out[l] = (q, k, qp, kp)
        else:
            out[l] = (q, k)
    return out


def token_windows(tokenizer, seq_len: int, *, files: Optional[list] = None, split: str = "train", seed: int = 0,
                  batch_size: int = 1) -> Iterator[Tensor]:
    """Endless ``[batch_size, seq_len]`` windows of tokenized local source files (shuffled, repeated);
    ``files`` default ``sparsattn.data.source_files(split)``."""
    from ..data import read_source_text, source_files

    files = list(source_files(split) if files is None else files)
    if not files:
        raise ValueError("files: expected at least one text file")
    rng = random.Random(seed)
    eos = getattr(tokenizer, "eos_token_id", None)
    buf: list[int] = []
    while True:
        order = list(files)
        rng.shuffle(order)
        for path in order:
            ids = tokenizer(read_source_text(path), add_special_tokens=True)["input_ids"]
            buf.extend(ids + ([eos] if eos is not None else []))
            while len(buf) >= seq_len * batch_size:
                chunk, buf = buf[: seq_len * batch_size], buf[seq_len * batch_size:]
                yield torch.tensor(chunk, dtype=torch.long).view(batch_size, seq_len)


def train_gates(model_path, out_path, *, steps: int = 1000, seq_len: int = 8192, device: Optional[str] = None,
                minutes: Optional[float] = None, batch_size: int = 1, lr: float = 1e-3, warmup: int = 20,
                layers=None, rope_input: str = "pre", seed: int = 0, files: Optional[list] = None,
                save_dtype: torch.dtype = torch.bfloat16,
                log: Optional[Callable[[str], None]] = print) -> Path:
    """train_gates: train SeerAttention gates for the local HF model at ``model_path``; save to ``out_path``.

    Args:
        steps: optimiser steps (the cosine schedule spans them); ``minutes`` caps wall time.
        seq_len: training sequence length (clipped to the model's ``max_position_embeddings``).
        device: default ``"cuda"`` when available, else ``"cpu"``.
        rope_input: ``"pre"`` (paper) or ``"post"``; see ``sparsattn.methods.seer_attention``.
        files: text files to train on (default ``sparsattn.data.source_files("train")``).
        save_dtype: dtype of the saved weights (bfloat16: half the bytes of float32, enough for top-k).
    Returns the gate directory (``gate.safetensors`` + ``config.json``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(str(model_path))
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        if log:
            log(f"seq_len {seq_len} > max_position_embeddings {max_pos}: using {max_pos}")
        seq_len = int(max_pos)
    gate = gate_for_model(model, rope_input=rope_input, layers=layers, seed=seed).to(device)
    gate.model_info.update({"model_path": str(model_path), "seq_len": seq_len, "steps": steps, "lr": lr,
                            "batch_size": batch_size, "data": "sparsattn.data.source_files('train')"})
    windows = token_windows(tok, seq_len, files=files, seed=seed, batch_size=batch_size)

    def batches():
        for ids in windows:
            yield capture_for_gate(model, ids.to(device), gate.layers)

    if log:
        log(f"training SeerAttention gates: {len(gate.layers)} layers, Hq={gate.num_q_heads}, Hkv={gate.num_kv_heads}, "
            f"D={gate.head_dim}, seq_len={seq_len}, steps={steps}, device={device}")
    t0 = time.time()
    losses = train_gate(gate, batches(), steps=steps, lr=lr, warmup=min(warmup, steps), minutes=minutes, log=log)
    gate.model_info.update({"steps_done": len(losses), "final_loss": losses[-1] if losses else None,
                            "first_loss": losses[0] if losses else None, "seconds": round(time.time() - t0, 1)})
    out = gate.save(out_path, dtype=save_dtype)
    if log:
        log(f"saved gate to {out} ({len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f})" if losses else
            f"saved untrained gate to {out}")
    return out


def main(argv=None) -> int:
    """main: the older command line (``sparsattn calibrate seer_attention`` is the entry point)."""
    ap = argparse.ArgumentParser(prog="python -m sparsattn.train.seer_gate",
                                 description="Train SeerAttention AttnGates (arXiv 2410.13276) on a local HF model "
                                             "(the entry point is now `sparsattn calibrate seer_attention`).")
    ap.add_argument("--model", required=True, help="local HF model directory (with its tokenizer)")
    ap.add_argument("--out", required=True, help="output gate directory")
    ap.add_argument("--minutes", type=float, default=None, help="wall-time cap")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--device", default=None)
    ap.add_argument("--rope-input", choices=("pre", "post"), default="pre")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    train_gates(a.model, a.out, steps=a.steps, seq_len=a.seq_len, device=a.device, minutes=a.minutes,
                batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, rope_input=a.rope_input, seed=a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
