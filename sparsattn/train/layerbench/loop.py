"""The training loop of the layer harness: one (layer, task, length, width, seed) run -> one row.

``train_layer("landmark", "mqar", seq_len=128, width=64, steps=1500, device="cpu")`` builds a
``LayerModel`` (``n_layers`` blocks of the layer, or the hybrid list given as ``mixers``), trains it
with AdamW (weight decay on matrices only), linear warmup + cosine decay, gradient clipping and the
layers' ``extra_loss()``; bf16 autocast on CUDA; evaluates on the held-out split every
``eval_every`` steps (stopping early at ``stop_at`` accuracy, Zoology's > 0.99 rule) and at the end.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import time
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ...nn import layer_class
from ...nn.base import attention_backend, preset_config
from .model import LayerModel
from .tasks import TaskData, make_task

#: per-task defaults (Zoology's MQAR models: 2 layers, no MLP, weight decay 0.1; LRA-style small
#: classifiers for ListOps / Pathfinder). Every key can be overridden by a keyword of train_layer.
TASK_DEFAULTS = {
    "mqar": dict(heads=2, n_layers=2, mlp=False, batch_size=64, lr=2e-3, weight_decay=0.1, dropout=0.0,
                 n_test=1000, eval_every=250),
    "listops": dict(heads=4, n_layers=2, mlp=True, batch_size=32, lr=1e-3, weight_decay=0.05, dropout=0.0,
                    n_test=2000, eval_every=0),
    "pathfinder": dict(heads=4, n_layers=2, mlp=True, batch_size=32, lr=1e-3, weight_decay=0.05, dropout=0.0,
                       n_test=2000, eval_every=0),
}

#: the columns of a result row (the grid's CSV)
COLUMNS = ["layer", "task", "seq_len", "width", "heads", "layers", "steps", "seed", "accuracy", "density",
           "train_density", "flops", "params", "steps_done", "final_loss", "lr", "batch_size", "train_s",
           "device", "torch", "date", "config", "curve"]


def _label(mixers: Sequence) -> str:
    names = [m if isinstance(m, str) else m[0] for m in mixers]
    return names[0] if len(set(names)) == 1 else "+".join(names)


def _lr_at(step: int, total: int, warmup: int, lr: float, time_frac: float = 0.0) -> float:
    """The learning rate at ``step`` of ``total``: linear warmup over ``warmup`` steps, then cosine to 10%.

    ``time_frac`` (elapsed / time limit) moves the schedule on when the time budget runs out before
    the step budget: the schedule's position is the further of the two, so a run cut by its time
    limit still warms up and decays inside that limit (a 20 000-step schedule cut at 1 700 steps
    would otherwise end still in its 2 000-step warmup)."""
    step = max(step, int(time_frac * total))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def task_loss(model: LayerModel, data: TaskData, x: torch.Tensor, y: torch.Tensor):
    """task_loss: ``(loss, n_correct, n_scored)`` of a batch: MQAR scores only labelled positions
    (the head runs on those rows only); classification pools over non-pad tokens."""
    h = model.hidden(x)
    if data.kind == "lm":
        sel = y != -100
        logits = model.head(h[sel]).float()
        tgt = y[sel]
    else:
        if data.pad_id is not None:
            keep = (x != data.pad_id).unsqueeze(-1).to(h.dtype)
            pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1)
        else:
            pooled = h.mean(1)
        logits = model.head(pooled).float()
        tgt = y
    loss = F.cross_entropy(logits, tgt)
    return loss, int((logits.argmax(-1) == tgt).sum()), int(tgt.numel())


@torch.no_grad()
def evaluate(model: LayerModel, data: TaskData, *, device, batch_size: int, limit: Optional[int] = None,
             autocast=None) -> float:
    """evaluate: held-out accuracy (the first ``limit`` test examples when given), eval mode."""
    was = model.training
    model.eval()
    n = data.x_test.shape[0] if limit is None else min(limit, data.x_test.shape[0])
    right = total = 0
    for s in range(0, n, batch_size):
        x = data.x_test[s:min(n, s + batch_size)].to(device)
        y = data.y_test[s:min(n, s + batch_size)].to(device)
        with autocast() if autocast else contextlib.nullcontext():
            _, c, t = task_loss(model, data, x, y)
        right, total = right + c, total + t
    model.train(was)
    return right / max(total, 1)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def train_layer(layer: Union[str, Sequence], task: Union[str, TaskData] = "mqar", *, seq_len: int = 64,
                width: int = 64, steps: int = 2000, seed: int = 0, device: str = "cpu",
                layer_config: Optional[dict] = None, heads: Optional[int] = None, n_layers: Optional[int] = None,
                batch_size: Optional[int] = None, lr: Optional[float] = None, weight_decay: Optional[float] = None,
                warmup: float = 0.1, clip: float = 1.0, mlp: Optional[bool] = None, dropout: Optional[float] = None,
                n_train: Optional[int] = None, n_test: Optional[int] = None, eval_every: Optional[int] = None,
                vocab: Optional[int] = None, stop_at: float = 0.99, backend: Optional[str] = None, progress: bool = True,
                time_limit_s: Optional[float] = None, schedule_time_s: Optional[float] = None,
                checkpoint: Optional[str] = None, stop_by: Optional[float] = None) -> dict:
    """train_layer: train one model around ``layer`` on ``task`` and return its result row (``COLUMNS``).

    Args:
        layer: a registered layer name (used in every block) or a list of names / ``(name, config)``
            per block (a hybrid, e.g. ``["baseconv", "dense"]``; its row is labelled ``"baseconv+dense"``).
        task: ``"mqar"``, ``"listops"``, ``"pathfinder"`` or a prepared ``TaskData``.
        seq_len, width: sequence length and model width; steps: optimizer steps; seed: data and init.
        device: ``"cpu"`` or ``"cuda"`` (bf16 autocast on CUDA).
        layer_config: hyper-parameters for the named layer(s), over the layer's ``presets[task]``
            (and ``presets["task:T"]`` at ``seq_len`` T: ``sparsattn.nn.base.preset_config``).
        heads, n_layers, batch_size, lr, weight_decay, mlp, dropout, n_test, eval_every: override
            ``TASK_DEFAULTS[task]``; n_train defaults to ``min(steps * batch_size, 100_000)``.
        vocab: MQAR vocabulary (default Zoology's 8192; the reduced CPU grid uses a smaller one).
        warmup: warmup fraction of the steps; clip: gradient-norm clip; stop_at: early-stop accuracy
            on the periodic evaluation (1000 test examples).
        backend: attention backend for the layers (default ``"reference"`` on the CPU, the
            library's table on CUDA).
        progress: tqdm bar.
        time_limit_s: stop training after this many seconds (then evaluate); the row's
            ``steps_done < steps`` shows it (the grid uses it to stay inside a device time limit). The
            learning-rate schedule (warmup, cosine) follows whichever budget, steps or time, runs out first.
        schedule_time_s: the time budget the schedule is spread over (default ``time_limit_s``); with
            ``checkpoint``, the whole run's training time over all its calls, so a run split into
            calls of ``time_limit_s`` seconds decays once, not once per call.
        checkpoint: a folder (``resume.py``): a run stopped by ``time_limit_s`` before its steps and
            its early stop saves its state there, and a later call with the same arguments goes on
            from it (the row then counts every call's steps and seconds); a finished run removes the
            state. A folder holding another run raises ``ValueError``.

        stop_by: a wall-clock time (``time.time()``) after which no training step starts, whatever
            ``time_limit_s`` allows: a sweep's deadline, which also covers the time spent building
            the task's data before training (a minute for 160 000 Pathfinder images).

    The row's ``curve`` column is the periodic evaluations as JSON ``[[step, accuracy], ...]`` (the
    final evaluation on the whole held-out split last), so a run cut by time shows whether it was
    still rising.
    """
    task_name = task.name if isinstance(task, TaskData) else task
    if task_name not in TASK_DEFAULTS:
        raise ValueError(f"task: expected one of {sorted(TASK_DEFAULTS)} or a TaskData, got {task!r}")
    d = dict(TASK_DEFAULTS[task_name])
    for k, v in (("heads", heads), ("n_layers", n_layers), ("batch_size", batch_size), ("lr", lr),
                 ("weight_decay", weight_decay), ("mlp", mlp), ("dropout", dropout), ("n_test", n_test),
                 ("eval_every", eval_every)):
        if v is not None:
            d[k] = v
    for k in ("steps", "width", "seq_len", "n_layers", "heads", "batch_size"):
        v = locals()[k] if k in ("steps", "width", "seq_len") else d[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k}: expected a positive int, got {v!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is available")
    mixers = [layer] * d["n_layers"] if isinstance(layer, str) else list(layer)
    base_cfg = {}
    if isinstance(layer, str):
        base_cfg = {**preset_config(layer_class(layer), task_name, seq_len), **(layer_config or {})}
    torch.manual_seed(seed)
    if isinstance(task, TaskData):
        data = task
    else:
        ntr = n_train if n_train is not None else min(steps * d["batch_size"], 100_000)
        data = make_task(task_name, seq_len, n_train=ntr, n_test=d["n_test"], seed=seed, vocab=vocab)
    model = LayerModel(mixers, width, d["heads"], vocab=data.vocab, max_len=data.seq_len, n_out=data.n_out,
                       causal=data.causal, mlp=d["mlp"], dropout=d["dropout"], grid=data.grid,
                       layer_config=base_cfg, prefix_len=getattr(data, "prefix_len", None)).to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(("embed", "pos"))]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith(("embed", "pos")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": d["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=d["lr"], betas=(0.9, 0.98))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else None
    be = backend if backend is not None else ("reference" if dev.type == "cpu" else None)
    gen = torch.Generator().manual_seed(seed + 1)
    n = data.x_train.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    warm = max(1, int(warmup * steps))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"{_label(mixers)} {task_name} T={data.seq_len} d={width}", leave=False)
    loss_ema, acc_mid, done, elapsed0, curve = None, None, 0, 0.0, []
    if schedule_time_s is not None and not (isinstance(schedule_time_s, (int, float)) and schedule_time_s > 0):
        raise ValueError(f"schedule_time_s: expected a positive number of seconds, got {schedule_time_s!r}")
    sched_s = schedule_time_s if schedule_time_s is not None else time_limit_s
    identity = {"layer": _label(mixers), "task": task_name, "seq_len": data.seq_len, "width": width, "steps": steps,
                "seed": seed, "lr": d["lr"], "batch_size": d["batch_size"], "n_layers": len(mixers), "heads": d["heads"],
                "n_train": n, "config": json.dumps(base_cfg, sort_keys=True, default=str),
                "schedule_time_s": sched_s}
    if checkpoint is not None:
        from .resume import load_run
        got = load_run(checkpoint, identity=identity, model=model, opt=opt, gen=gen)
        if got is not None:
            perm, pos, done = got["perm"], int(got["pos"]), int(got["done"])
            elapsed0, loss_ema, curve = float(got["elapsed_s"]), got["loss_ema"], list(got["curve"])
            acc_mid = curve[-1][1] if curve else None
            if bar is not None:
                bar.update(done)
    stopped_by_time = False
    t0 = time.perf_counter() - elapsed0
    with attention_backend(be):
        model.train()
        for step in range(done, steps):
            if pos + d["batch_size"] > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + d["batch_size"]]
            pos += d["batch_size"]
            x, y = data.x_train[idx].to(dev, non_blocking=True), data.y_train[idx].to(dev, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, warm, d["lr"], (time.perf_counter() - t0) / sched_s if sched_s else 0.0)
            with autocast() if autocast else contextlib.nullcontext():
                loss, _, _ = task_loss(model, data, x, y)
                extra = model.extra_loss()
                total = loss + extra if extra is not None else loss
            if not torch.isfinite(total):
                raise RuntimeError(f"{_label(mixers)}: non-finite loss at step {step} ({float(total)})")
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            done = step + 1
            lv = float(loss.detach())
            loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema:.3f}", acc=acc_mid)
            if d["eval_every"] and done % d["eval_every"] == 0 and done < steps:
                acc_mid = round(evaluate(model, data, device=dev, batch_size=d["batch_size"], limit=1000,
                                         autocast=autocast), 4)
                curve.append([done, acc_mid])
                if acc_mid >= stop_at:
                    break
            if (time_limit_s is not None and time.perf_counter() - t0 - elapsed0 > time_limit_s) or \
                    (stop_by is not None and time.time() > stop_by):
                stopped_by_time = done < steps
                break
        train_s = time.perf_counter() - t0
        if checkpoint is not None:
            from .resume import clear_run, save_run
            if stopped_by_time:
                save_run(checkpoint, identity=identity, model=model, opt=opt, perm=perm, gen=gen,
                         loop={"pos": pos, "done": done, "elapsed_s": train_s, "loss_ema": loss_ema, "curve": curve})
            else:
                clear_run(checkpoint)
        acc = evaluate(model, data, device=dev, batch_size=d["batch_size"], autocast=autocast)
        curve.append([done, round(acc, 4)])
        cost = model.cost(data.seq_len)
    if bar is not None:
        bar.close()
    cfgs = [m.config() if hasattr(m, "config") else {} for m in model.mixers()]
    return {
        "layer": _label(mixers), "task": task_name, "seq_len": data.seq_len, "width": width, "heads": d["heads"],
        "layers": len(mixers), "steps": steps, "seed": seed, "accuracy": round(acc, 4),
        "density": None if cost["density"] is None else round(cost["density"], 4),
        "train_density": None if cost["train_density"] is None else round(cost["train_density"], 4),
        "flops": cost["flops"], "params": sum(p.numel() for p in model.parameters()), "steps_done": done,
        "final_loss": round(loss_ema, 4) if loss_ema is not None else None, "lr": d["lr"],
        "batch_size": d["batch_size"], "train_s": round(train_s, 1), "device": _device_name(dev),
        "torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": json.dumps(cfgs, sort_keys=True, default=str), "curve": json.dumps(curve),
    }
