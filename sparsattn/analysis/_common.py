"""analysis._common: what several analyses share: reading a model's parts, one attention-edit
swap, causal attention rows from captured q/k, teacher-forced task scoring and the output writer.

Model loading, q/k/v capture, task prompts and teacher-forced scoring are the repo's own
(``evaluate.load_model``, ``capture.capture_qkv``, ``eval.prefill_quality.make_prompts`` /
``teacher_forced_predict`` / ``score_teacher_forced``); nothing here copies them.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

_IMPL = "sparsattn_analysis"


# ----------------------------------------------------------------------------------------------
# model parts
# ----------------------------------------------------------------------------------------------

def attention_layers(model) -> dict:
    """attention_layers: ``{layer: attention module}`` (``integrations.hf.attention_modules``); a model
    without readable attention modules raises one ValueError naming what is missing."""
    from ..integrations.hf import attention_modules

    return attention_modules(model)


def mlp_layers(model) -> dict:
    """mlp_layers: ``{layer: gated MLP module}`` (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``;
    the Llama / Mistral / Qwen2 form ``down(act(gate(x)) * up(x))``); ValueError naming what is missing."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"model: {type(model).__name__} has no decoder layer list (model.model.layers) to read MLPs from")
    out = {}
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise ValueError(f"model: layer {i} ({type(layer).__name__}) has no `mlp` module")
        miss = [a for a in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, a)]
        if miss:
            raise ValueError(f"model: layer {i} MLP ({type(mlp).__name__}) is not a gated MLP: missing {', '.join(miss)}")
        out[i] = mlp
    if not out:
        raise ValueError(f"model: {type(model).__name__} has no decoder layers")
    return out


def load(model_path=None, device: str = "cpu"):
    """load: ``(model, tokenizer, path)`` through ``sparsattn.models.load.load_model`` (None = the bundled model)."""
    from ..models.load import load_model

    return load_model(model_path, device=device)


# ----------------------------------------------------------------------------------------------
# attention rows and edits
# ----------------------------------------------------------------------------------------------

def attention_rows(q: torch.Tensor, k: torch.Tensor, scale: float, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """attention_rows: causal softmax attention ``[B, Hq, R, Tk]`` (fp32) of the query rows ``rows``
    (default all) of q ``[B, Hq, Tq, D]`` over k ``[B, Hkv, Tk, D]`` (GQA; bottom-right causal alignment)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"k: expected kv heads dividing the {Hq} query heads, got {Hkv}")
    idx = torch.arange(Tq, device=q.device) if rows is None else torch.as_tensor(list(rows), device=q.device)
    kk = k.float().repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(q[:, :, idx].float(), kk.transpose(-1, -2)) * scale
    pos = idx[:, None] + (Tk - Tq)
    s = s.masked_fill(torch.arange(Tk, device=q.device)[None, :] > pos, float("-inf"))
    return torch.softmax(s, -1)


@dataclass
class Edit:
    """Edit: one layer's attention change. ``zero_heads``: query heads whose output is set to 0 (the
    retrieval-head masking test); ``probs``: ``fn(p [B, Hq, Tq, Tk]) -> p`` applied to the eager
    attention probabilities (ACT calibration)."""

    zero_heads: tuple = ()
    probs: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _edited_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ed: Optional[Edit] = getattr(module, "_sparsattn_edit", None)
    if ed is None or ed.probs is None:
        out, w = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
    else:
        B, Hq, Tq, D = query.shape
        Tk = key.shape[2]
        scale = float(scaling if scaling is not None else getattr(module, "scaling", D ** -0.5))
        p = attention_rows(query, key, scale)  # [B, Hq, Tq, Tk], causal
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
            p = p * attention_mask[..., -Tq:, -Tk:].to(p.dtype)
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        p = ed.probs(p)
        vv = value.float().repeat_interleave(Hq // value.shape[1], dim=1)
        out = torch.matmul(p, vv).to(query.dtype).transpose(1, 2).contiguous()
        w = None
    if ed is not None and ed.zero_heads:
        out = out.clone()
        out[:, :, list(ed.zero_heads)] = 0
    return out, w


@contextlib.contextmanager
def edit_attention(model, edits: dict):
    """edit_attention: run ``model`` with ``{layer: Edit}`` applied (registered through transformers'
    ``AttentionInterface``; layers without an edit run SDPA unchanged); the previous implementation is
    restored on exit in all cases."""
    from ..integrations.hf import attention_swapped

    mods = attention_layers(model)
    bad = sorted(set(edits) - set(mods))
    if bad:
        raise ValueError(f"edits: unknown layer(s) {bad}; the model's attention layers are {sorted(mods)}")
    try:
        for l, e in edits.items():
            mods[l].__dict__["_sparsattn_edit"] = e
        with attention_swapped(model, _IMPL, _edited_forward, modules=mods):
            yield
    finally:
        for m in mods.values():
            m.__dict__.pop("_sparsattn_edit", None)


def heads_to_edits(heads: Sequence[tuple]) -> dict:
    """heads_to_edits: ``[(layer, head), ...]`` -> ``{layer: Edit(zero_heads=...)}``."""
    by: dict = {}
    for l, h in heads:
        by.setdefault(int(l), []).append(int(h))
    return {l: Edit(zero_heads=tuple(sorted(hs))) for l, hs in by.items()}


# ----------------------------------------------------------------------------------------------
# teacher-forced task scoring (exact: every answer token must be the argmax)
# ----------------------------------------------------------------------------------------------

def task_prompts(tok, task: str, length: int, n: int, seed: int = 0) -> list:
    """task_prompts: ``eval.prefill_quality.make_prompts`` (prompt ids + gold answer ids, depths
    ``linspace(0, 1, n)`` for needle tasks)."""
    from ..eval.prefill_quality import make_prompts

    return make_prompts(tok, task, length, n, seed)


def exact_count(model, samples: list, edits: Optional[dict] = None, device: str = "cpu") -> tuple[int, int, list]:
    """exact_count: ``(correct, n, per-sample 0/1)``: a sample is correct when every gold answer token is
    the model's argmax in one forward over prompt + answer (``teacher_forced_predict``), with ``edits``."""
    from ..eval.teacher_forced import score_teacher_forced, teacher_forced_predict

    ctx = edit_attention(model, edits) if edits else contextlib.nullcontext()
    hits = []
    with ctx:
        for s in samples:
            pred = teacher_forced_predict(model, s.prompt_ids, s.answer_ids, device)
            hits.append(int(score_teacher_forced(pred, s.answer_ids)["correct"]))
    return sum(hits), len(hits), hits


def nll(model, ids: torch.Tensor) -> float:
    """nll: mean next-token negative log-likelihood (nats) of ``ids [B, T]`` under ``model`` (no cache)."""
    with torch.no_grad():
        lg = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    v = float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1)))
    if not math.isfinite(v):
        raise FloatingPointError("model: non-finite loss")
    return v


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------

@dataclass
class Report:
    """Report: an analysis result: ``rows`` (the CSV / printed table), ``summary`` (JSON), the table
    columns and title, and the plot function ``plot(path)``."""

    name: str
    rows: list
    summary: dict
    columns: list
    title: str
    plot: Optional[Callable[[Path], None]] = None
    extra_csv: dict = field(default_factory=dict)

    def write(self, out_dir, *, show: bool = True) -> list:
        """write: ``<name>.json`` (summary + rows + environment, through ``calibration.write_json``),
        ``<name>.csv``, ``<name>.png``; prints the table; returns the written paths."""
        from ..bench.common import environment, print_table, write_csv
        from ..calibration import write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [Path(write_json(out / f"{self.name}.json", _jsonable({"analysis": self.name, "summary": self.summary,
                                                                       "rows": self.rows, "env": environment()})))]
        paths.append(write_csv(self.rows, out / f"{self.name}.csv", self.columns))
        for k, rows in self.extra_csv.items():
            paths.append(write_csv(rows, out / f"{self.name}_{k}.csv"))
        if self.plot is not None:
            import matplotlib

            matplotlib.use("Agg")
            self.plot(out / f"{self.name}.png")
            paths.append(out / f"{self.name}.png")
        if show:
            print_table(self.rows[:16], self.columns, title=self.title)
            print("wrote " + ", ".join(str(p) for p in paths))
        return paths


def accuracy_bars(ax, rows: Sequence[dict], labels: Sequence[str], colors, *, fontsize: int = 8) -> None:
    """Bars of ``rows[i]["accuracy"]`` (%) with the ``correct/n`` count above each, on ``ax``."""
    ax.bar(range(len(rows)), [r["accuracy"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), labels, fontsize=fontsize)
    for i, r in enumerate(rows):
        ax.text(i, r["accuracy"] + 1, f"{r['correct']}/{r['n']}", ha="center", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("passkey exact accuracy (%)")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def progress(it, desc: str, enabled: bool = True, total: Optional[int] = None):
    """progress: a tqdm bar over ``it`` (plain iteration when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, disable=not enabled, total=total, leave=False)


class Timer:
    """Timer: ``with Timer() as t: ...; t.s`` seconds."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t0
