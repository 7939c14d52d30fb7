"""fit_methods: RazorAttention and MASFormer fitted from retrieval-head scores (Retrieval Head, arXiv
2404.15574 -> RazorAttention, arXiv 2407.15891; MASFormer, arXiv 2310.12442).

- razor: the top ``n`` (layer, head) pairs by retrieval score keep full attention; written in the
  calibration format ``RazorAttention.load`` reads (``calibration.save_calibration``; ``data.<layer>
  .retrieval_heads`` plus the scores as ``data.<layer>.retrieval``).
- masformer: the ``n_full`` layers with the largest summed retrieval score stay dense; written as a
  plan ``{"full_layers": [...], "inner": "a_shape", "inner_config": {...}}`` (``calibration.write_json``)
  and read back with ``read_masformer_plan``.

Fitting lives here, above ``methods/`` (imports flow down).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..calibration import ModelShape, read_json, save_calibration, write_json
from ._common import Report, accuracy_bars, attention_layers, progress, task_prompts


def model_shape(model) -> ModelShape:
    """model_shape: the attention shape (layers, query heads, kv heads, head dim) of a transformers model."""
    mods = attention_layers(model)
    c = next(iter(mods.values())).config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelShape(len(mods), int(c.num_attention_heads), int(c.num_key_value_heads), int(hd))


def _check_scores(scores, shape: ModelShape) -> torch.Tensor:
    s = torch.as_tensor(scores, dtype=torch.float64)
    if tuple(s.shape) != (shape.num_layers, shape.num_heads) or not bool(torch.isfinite(s).all()):
        raise ValueError(f"scores: expected finite [layers={shape.num_layers}, heads={shape.num_heads}] "
                         f"retrieval scores, got {tuple(s.shape)}")
    return s


def fit_razor(scores, shape: ModelShape, n_heads: int, path) -> str:
    """fit_razor: razor calibration with the top ``n_heads`` heads by retrieval score as retrieval
    heads -> the written path (``RazorAttention.load(path)`` reads it)."""
    s = _check_scores(scores, shape)
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or not 0 <= n_heads <= s.numel():
        raise ValueError(f"n_heads: expected an int in [0, {s.numel()}], got {n_heads!r}")
    keep = torch.zeros(s.numel(), dtype=torch.bool)
    if n_heads:
        keep[torch.topk(s.flatten(), n_heads).indices] = True
    keep = keep.view(s.shape)
    data = {str(l): {"retrieval_heads": keep[l].nonzero().flatten().tolist(), "retrieval": s[l].tolist()}
            for l in range(shape.num_layers)}
    return save_calibration(path, "razor", shape, data, {"source": "retrieval-heads analysis (arXiv 2404.15574)",
                                                         "rule": f"top {n_heads} heads by retrieval score"})


def fit_masformer(scores, shape: ModelShape, n_full: int, path, inner_config: Optional[dict] = None) -> str:
    """fit_masformer: a masformer layer plan keeping the ``n_full`` layers with the highest summed
    retrieval score dense, ``a_shape`` (``inner_config``) elsewhere -> the written path."""
    s = _check_scores(scores, shape)
    if isinstance(n_full, bool) or not isinstance(n_full, int) or not 0 <= n_full <= shape.num_layers:
        raise ValueError(f"n_full: expected an int in [0, {shape.num_layers}], got {n_full!r}")
    per_layer = s.sum(1)
    full = sorted(torch.topk(per_layer, n_full).indices.tolist()) if n_full else []
    doc = {"format": "sparsattn-masformer-plan", "model_shape": shape.to_dict(), "full_layers": full,
           "inner": "a_shape", "inner_config": dict(inner_config or {}), "layer_scores": per_layer.tolist()}
    return write_json(path, doc)


def read_masformer_plan(path) -> dict:
    """read_masformer_plan: ``{"full_layers", "inner", "inner_config"}`` of a plan written by
    ``fit_masformer`` (every field checked; errors name the file and field) -> masformer kwargs."""
    root = read_json(path, arg="path", kind="masformer plan JSON")
    if root.get("format") is None or root["format"].as_str() != "sparsattn-masformer-plan":
        raise root.error("a masformer plan (format 'sparsattn-masformer-plan')")
    n = ModelShape.from_field(root["model_shape"]).num_layers
    return {"full_layers": tuple(root["full_layers"].int_list(0, n - 1)), "inner": root["inner"].as_str(),
            "inner_config": root["inner_config"].plain()}


def read_scores(path, shape: ModelShape) -> torch.Tensor:
    """read_scores: the ``[layers, heads]`` retrieval scores of a ``retrieval_heads.json`` written by
    ``sparsattn analyze retrieval-heads`` (checked; errors name the file and field)."""
    root = read_json(path, arg="--scores", kind="retrieval_heads.json")
    rows = root["summary"]["scores"].as_list(shape.num_layers)
    return _check_scores([r.float_list(shape.num_heads) for r in rows], shape)


def razor_own_subset(reference: str, shape: ModelShape, n_heads: int, path) -> str:
    """razor_own_subset: razor's own (echo/induction) calibration cut to its ``n_heads`` best heads by
    induction score (the score that picks most of its retrieval heads) -> the written path."""
    from ..calibration import read_calibration

    cal = read_calibration(reference, "razor", shape)
    ind = torch.tensor([d["induction"].float_list(shape.num_heads)
                        for _, d in sorted(cal.data.int_keys(0, shape.num_layers).items())], dtype=torch.float64)
    return fit_razor(ind, shape, n_heads, path)


def _patched_count(model, method, samples, device):
    from ..integrations.hf import patched
    from ._common import exact_count

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with patched(model, method=method) if method is not None else contextlib.nullcontext():
            return exact_count(model, samples, None, device)


def fit_and_compare(model, tok, scores, out_dir, *, compare: bool = True, length: int = 1024, n: int = 8,
                    seed: int = 0, device: str = "cpu", window: int = 64, n_sink: int = 4,
                    razor_reference: Optional[str] = None, head_budgets=(2, 4), show_progress: bool = True) -> Optional[Report]:
    """fit_and_compare: write ``razor_from_retrieval.json`` (as many heads as razor's own calibration
    ``razor_reference``, default the bundled model's) and ``masformer_plan.json`` (as many dense layers as
    layers holding a razor retrieval head... at least 1) into ``out_dir``; with ``compare``, exact passkey
    counts at ``length`` of dense, razor (own calibration), razor (ours) at the same KV budget (same heads
    kept full, sink ``n_sink`` + window ``window`` elsewhere) and the masformer plan -> ``Report``."""
    from ..calibration import read_calibration
    from ..methods import get_method

    shape = model_shape(model)
    out = Path(out_dir)
    if razor_reference is None:
        from ..models import BUNDLED_DIR

        razor_reference = str(BUNDLED_DIR / "calibration" / "razor.json")
    ref = read_calibration(razor_reference, "razor", shape)
    n_ret = sum(len(d["retrieval_heads"].as_list()) for d in ref.data.int_keys(0, shape.num_layers).values())
    ours = fit_razor(scores, shape, n_ret, out / "razor_from_retrieval.json")
    n_full = max(1, round(n_ret / shape.num_heads))
    inner = {"n_init": n_sink, "n_local": window, "block_size": 32}
    plan = fit_masformer(scores, shape, n_full, out / "masformer_plan.json", inner)
    print(f"wrote {ours} ({n_ret} retrieval heads) and {plan} (dense layers {read_masformer_plan(plan)['full_layers']})")
    if not compare:
        return None
    rz = dict(n_sink=n_sink, min_window=window, compression=1e9, block_size=32)
    settings = [("dense", None, "all heads full", shape.num_layers * shape.num_heads)]
    for b in sorted(set(int(x) for x in (head_budgets or ()) if 0 < int(x) < n_ret)) + [n_ret]:
        own = razor_reference if b == n_ret else razor_own_subset(razor_reference, shape, b, out / f"razor_own_top{b}.json")
        mine = ours if b == n_ret else fit_razor(scores, shape, b, out / f"razor_from_retrieval_top{b}.json")
        settings += [("razor (echo/induction)", get_method("razor", path=own, **rz), f"{b} heads full", b),
                     ("razor (retrieval scores)", get_method("razor", path=mine, **rz), f"{b} heads full", b)]
    settings.append(("masformer (retrieval layers)", get_method("masformer", block_size=32, **read_masformer_plan(plan)),
                     f"{n_full} layers full", n_full * shape.num_heads))
    samples = task_prompts(tok, "passkey", length, n, seed + 2)
    T = len(samples[0].prompt_ids) + len(samples[0].answer_ids)
    kept_other = min(T, n_sink + window) / T
    rows = []
    for name, m, full, n_full_heads in progress(settings, "razor/masformer compare", show_progress):
        c, N, hits = _patched_count(model, m, samples, device)
        frac_full = n_full_heads / (shape.num_heads * shape.num_layers)
        kv = frac_full + (1 - frac_full) * kept_other
        rows.append({"setting": name, "full": full, "kv_fraction": round(kv, 4), "correct": c, "n": N,
                     "accuracy": round(100.0 * c / N, 1), "per_sample": "".join(map(str, hits))})

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(11, 4))
        col = {"dense": "grey", "razor (echo/induction)": "C0", "razor (retrieval scores)": "C3"}
        accuracy_bars(ax, rows, [f"{r['setting'].replace(' (', chr(10) + '(')}\n{r['full']}\nKV {r['kv_fraction']:.2f}"
                                 for r in rows], [col.get(r["setting"], "C2") for r in rows], fontsize=5)
        ax.set_title(f"passkey @ {length}: sink {n_sink} + window {window} outside the full heads/layers", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    rep = Report("fit_compare", rows, {"length": length, "n": n, "window": window, "n_sink": n_sink,
                                       "razor_reference": razor_reference, "razor_ours": ours, "masformer_plan": plan,
                                       "rows": rows},
                 ["setting", "full", "kv_fraction", "correct", "n", "accuracy"],
                 f"methods fitted from retrieval heads vs razor's own calibration (passkey @ {length})", plot)
    rep.write(out)
    return rep
