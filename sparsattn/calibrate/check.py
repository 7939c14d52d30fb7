"""calibrate.check: do the calibrated methods retrieve? Teacher-forced passkey and needle coverage of
MInference (arXiv 2407.02490), SeerAttention (arXiv 2410.13276), RazorAttention (arXiv 2407.15891)
and MoA (arXiv 2406.14909) against ``oracle_topk`` at the same density, on held-out haystacks.

Protocol (issue 21): ``n`` passkey prompts (RULER niah_single: a 7-digit value, the needle at depths
``linspace(0, 1, n)``) in a haystack of *held-out* source lines (``sparsattn.eval.tasks``,
``haystack="code"``: files of ``source_files("heldout")``, never seen in training or calibration),
seed ``EVAL_SEED``; the answer is decided by the sparse prefill (one teacher-forced forward of
prompt + answer through the patched model, correct iff every answer token is the argmax). Each
method is set to about ``target`` density: ``oracle_topk`` (knob ``density``), ``seer_attention``
(top-k ``nz_ratio``, ``last_block_dense=False``: the gate decides every block) and ``razor``
(window of the non-retrieval heads) are aimed at it on the first prompt's dense q/k; ``minference``
and ``moa`` run their calibrated plans (the calibration fixes the density; it is recorded). Density
= the mean over every select call of the patched runs (kept / causal pairs).

Needle coverage (``sparsattn.eval.needle.needle_coverage``) is measured on each prompt's dense q/k:
the heads whose answer rows put >= ``threshold`` of their attention on the value's tokens, and
whether the method's pattern on the same q/k keeps them. The gate's block recall against the
oracle (``gate_block_recall``) is the share of ``oracle_topk``'s top-k blocks (the same k per row)
that SeerAttention's gate selects, per layer.

CLI: ``python -m sparsattn.calibrate.check --out DIR [--length 4096] [--n 10] [--target 0.1]
[--methods ...] [--cal-dir DIR]`` (default calibrations: the shipped ones).
"""
from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..methods import get_method
from ..methods.base import SelectContext, SelectHook

EVAL_SEED = 2112
METHODS = ("dense", "oracle_topk", "minference", "seer_attention", "razor", "moa")
#: also accepted: ``seer_attention:threshold`` (the gate in threshold mode), ``NAME:d0.06`` (aimed at
#: density 0.06 instead of the run's target), ``oracle_topk:k4`` (4 key blocks per query block row,
#: SeerAttention's top-k allocation, instead of a share of each row's causal blocks)
BLOCK = 64


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Densities(SelectHook):
    def __init__(self, method):
        super().__init__(method)
        self.values: list[float] = []

    def on_select(self, orig, q, k, ctx=None, *a, **kw):
        p = orig(q, k, ctx, *a, **kw)
        self.values.append(float(p.density))
        return p


def _find_last(seq: list, sub: list) -> int:
    for s in range(len(seq) - len(sub), -1, -1):
        if seq[s:s + len(sub)] == sub:
            return s
    return -1


def eval_prompts(tok, length: int, n: int, *, seed: int = EVAL_SEED, haystack: str = "code") -> list[dict]:
    """eval_prompts: ``n`` teacher-forcing passkey prompts of at most ``length`` tokens (prompt +
    answer) in a held-out haystack: ``{"prompt_ids", "answer_ids", "needle" (the value's token
    positions in the prompt), "rows" (the answer-deciding rows), "depth"}``."""
    from ..eval.tasks import make_samples
    from ..eval.teacher_forced import teacher_forced_ids

    out = []
    for s in make_samples("passkey", tok, length - 16, n, seed=seed, progress=False, haystack=haystack):
        p, a = teacher_forced_ids(tok, s.prompt, s.answers[0])
        digits = [t for t in a if tok.decode([t]).strip()]
        start = _find_last(p, digits)
        if start < 0:
            raise ValueError(f"passkey prompt (seed {seed}): the value's tokens are not in the prompt")
        P = len(p)
        out.append({"prompt_ids": p, "answer_ids": a, "needle": list(range(start, start + len(digits))),
                    "rows": list(range(P - 1, P - 1 + len(a))), "depth": float(s.meta.get("depth", float("nan")))})
    return out


def capture(model, ids: list):
    """``(layers {l: (q, k, v, q_pre, k_pre)}, scales {l: float})`` of one dense forward over ``ids``."""
    from ..eval.prefill_quality import capture_prompt

    cap = capture_prompt(model, torch.tensor([ids]))
    return cap.layers, cap.scales


def _ctx(method, layer, q, k, v, qp, kp, scale, state):
    extras = {"phase": "prefill", "q_lens": None, "kv_lens": None, "padding_side": "right", "sliding_window": None,
              "num_kv_groups": q.shape[1] // k.shape[1], "v": v}
    if getattr(method, "needs_pre_rope", False):
        extras["q_pre_rope"], extras["k_pre_rope"] = qp, kp
    return SelectContext(layer=layer, causal=True, scale=scale, q_offset=0, state=state, extras=extras)


def select_layers(method, layers: dict, scales: dict) -> dict:
    """``{layer: pattern}`` of ``method`` on captured layers (in order, one shared state)."""
    state: dict = {}
    out = {}
    for l, (q, k, v, qp, kp) in layers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[l] = method.select(q, k, _ctx(method, l, q, k, v, qp, kp, scales[l], state))
    return out


def mean_density(method, layers: dict, scales: dict) -> float:
    """Mean pattern density of ``method`` over the captured layers."""
    pats = select_layers(method, layers, scales)
    return sum(float(p.density) for p in pats.values()) / len(pats)


def aim(build: Callable[[float], object], layers: dict, scales: dict, target: float, lo: float, hi: float, *,
        integer: bool = False, increasing: bool = True, iters: int = 8) -> tuple[float, float]:
    """aim: bisect the knob ``x`` in ``[lo, hi]`` so that ``mean_density(build(x))`` is closest to
    ``target`` -> ``(x, density)``."""
    best = None
    a, b = lo, hi
    for _ in range(iters):
        x = (a + b) / 2
        x = round(x) if integer else x
        d = mean_density(build(x), layers, scales)
        if best is None or abs(d - target) < abs(best[1] - target):
            best = (x, d)
        if (d < target) == increasing:
            a = x
        else:
            b = x
        if integer and b - a <= 1:
            break
    return best


def gate_block_recall(seer, layers: dict, scales: dict, k_per_row: int) -> list[float]:
    """gate_block_recall: per layer, the share of the oracle's top-``k_per_row`` key blocks (exact
    block-max attention, diagonal excluded, causal rows with more than ``k_per_row`` candidates)
    that SeerAttention's gate ranks in its own top ``k_per_row``."""
    from ..kernels import estimate

    out = []
    state: dict = {}
    for l, (q, k, v, qp, kp) in layers.items():
        ctx = _ctx(seer, l, q, k, v, qp, kp, scales[l], state)
        g = seer.block_logits(q, k, ctx)
        s = estimate.exact_block_scores(q, k, BLOCK, BLOCK, scale=scales[l], causal=True, reduce="max").float()
        nq, nk = s.shape[-2:]
        allowed = torch.ones(nq, nk, dtype=torch.bool).tril()
        cand = allowed & ~torch.eye(nq, nk, dtype=torch.bool)
        rows = cand.sum(-1) > k_per_row
        g = g.masked_fill(~cand, float("-inf"))[..., rows, :]
        s = s.masked_fill(~cand, float("-inf"))[..., rows, :]
        gi = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(k_per_row, -1).indices, True)
        oi = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k_per_row, -1).indices, True)
        out.append(float((gi & oi).sum()) / max(1, float(oi.sum())))
    return out


def razor_top(src: str, n_heads: int, out_path: str) -> str:
    """razor_top: a copy of the razor calibration ``src`` keeping the ``n_heads`` heads with the highest
    stored score (``retrieval`` when the file has it, else ``induction``) as its retrieval heads."""
    from ..calibration import read_json

    doc = read_json(src, kind="razor calibration").plain()
    pairs = []
    for layer, d in doc["data"].items():
        sc = d.get("retrieval") or d.get("induction")
        if not sc:
            raise ValueError(f"{src}: data.{layer}: expected 'retrieval' or 'induction' scores to rank heads by")
        pairs += [(float(v), int(layer), h) for h, v in enumerate(sc)]
    keep = sorted(pairs, reverse=True)[:n_heads]
    for layer, d in doc["data"].items():
        d["retrieval_heads"] = sorted(h for _, l, h in keep if l == int(layer))
    doc["config"] = dict(doc.get("config") or {}, derived_from=Path(src).name, rule=f"top {n_heads} heads")
    Path(out_path).write_text(json.dumps(doc, indent=1) + "\n")
    return out_path


def build_settings(methods: Sequence[str], layers: dict, scales: dict, T: int, target: float, cal_dir: Path,
                   work_dir: Path) -> dict:
    """``{method: (config dict, aimed density on the first prompt)}`` at ``target`` density (razor: the
    calibration's retrieval heads dense, at most ``int(0.8 x target x heads)`` of them, by stored score,
    so that a window is left for the others; derived files in ``work_dir``;
    ``seer_attention:threshold``: the gate in threshold mode, the threshold aimed at the density)."""
    out = {}
    for name in methods:
        if name == "dense":
            out[name] = ({}, 1.0)
        elif name == "oracle_topk":
            # its density depends only on the knob and the length (ceil(density x causal blocks) per row):
            # aimed on one-head, 4-dim stand-ins of the same length, not on the model's q/k
            g = torch.Generator().manual_seed(0)
            qk = torch.randn(1, 1, T, 4, generator=g)
            f = lambda x: dict(block_size=BLOCK, top_k=None, density=round(float(x), 5), reduce="max")
            x, d = aim(lambda x: get_method("oracle_topk", **f(x)), {0: (qk, qk, qk, None, None)}, {0: 0.5},
                       target, 0.2 * target, 2 * target)
            out[name] = (f(x), d)
        elif name == "seer_attention":
            gate = str(cal_dir / "seer_gate")
            f = lambda x: dict(gate_path=gate, nz_ratio=round(float(x), 5), last_block_dense=False)
            x, d = aim(lambda x: get_method("seer_attention", **f(x)), layers, scales, target, 1e-3, 0.6)
            out[name] = (f(x), d)
        elif name == "razor":
            src = str(cal_dir / "razor.json")
            n_cal = sum(len(h) for h in get_method("razor", path=src).retrieval_heads.values())
            n_all = sum(q.shape[1] for q, *_ in layers.values())
            n_heads = max(1, min(n_cal, int(0.8 * target * n_all)))
            path = razor_top(src, n_heads, str(work_dir / f"razor_top{n_heads}.json"))
            f = lambda x: dict(path=path, n_sink=4, min_window=int(x), compression=float(T), block_size=BLOCK)
            x, d = aim(lambda x: get_method("razor", **f(x)), layers, scales, target, 1, T, integer=True)
            out[name] = (f(x), d)
        elif name.startswith("oracle_topk:k"):  # a uniform top-k per row, as SeerAttention's top-k mode
            cfg = dict(block_size=BLOCK, top_k=int(name.split(":k")[1]), density=None, reduce="max")
            out[name] = (cfg, mean_density(get_method("oracle_topk", **cfg), layers, scales))
        elif name == "seer_attention:threshold":
            gate = str(cal_dir / "seer_gate")
            f = lambda x: dict(gate_path=gate, threshold=float(f"{10 ** x:.4g}"), last_block_dense=False)
            x, d = aim(lambda x: get_method("seer_attention", **f(x)), layers, scales, target, -4.0, -0.5,
                       increasing=False)
            out[name] = (f(x), d)
        elif name in ("minference", "moa"):
            cfg = dict(path=str(cal_dir / f"{name}.json"))
            out[name] = (cfg, mean_density(get_method(name, **cfg), layers, scales))
        else:
            raise ValueError(f"methods: expected names from {METHODS}, got {name!r}")
    return out


def _parse(spec: str, cal_dirs: dict) -> tuple[str, Path]:
    """``name[:variant][@label]`` -> (``name[:variant]``, calibration folder of ``label``)."""
    name, _, label = spec.partition("@")
    label = label or "shipped"
    if label not in cal_dirs:
        raise ValueError(f"methods: {spec!r} names calibration folder {label!r}; known: {sorted(cal_dirs)}")
    return name, Path(cal_dirs[label])


def run(out_dir, *, length: int = 4096, n: int = 10, target: float = 0.1, methods: Sequence[str] = METHODS,
        cal_dirs: Optional[dict] = None, coverage_only: Sequence[str] = (), threshold: float = 0.1,
        keep: float = 0.5, seed: int = EVAL_SEED, haystack: str = "code", tag: str = "",
        recall_for: Optional[str] = None) -> list[dict]:
    """run: the table of the module docstring for one length -> rows (written after every method to
    ``check_<length><tag>.json`` / ``.csv`` in ``out_dir``).

    ``methods``: specs ``name[:variant][@label]``, ``label`` a key of ``cal_dirs`` (default
    ``{"shipped": shipped_dir()}``); the methods in ``coverage_only`` get the needle coverage and
    density but no passkey run (``correct`` left empty); ``recall_for``: a seer spec whose gate's
    block recall against the oracle is reported per layer (``extra.gate_block_recall``).
    """
    from ..bench.common import write_csv
    from ..eval.needle import needle_coverage
    from ..eval.teacher_forced import score_teacher_forced, teacher_forced_predict
    from ..integrations.hf import patched
    from ._common import load_model, shipped_dir

    cal_dirs = dict({"shipped": str(shipped_dir())}, **(cal_dirs or {}))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"check_{length}{tag}"
    model, tok, _ = load_model()
    t0 = time.time()
    prompts = eval_prompts(tok, length, n, seed=seed, haystack=haystack)
    caps = []
    with torch.no_grad():
        for p in prompts:
            caps.append(capture(model, p["prompt_ids"] + p["answer_ids"]))
    _log(f"{n} prompts at {length} captured ({time.time() - t0:.0f} s)")
    rows, extra = [], {}
    doc = {"rows": rows, "extra": extra,
           "protocol": {"haystack": f"{haystack} (held-out source files)", "seed": seed, "threshold": threshold,
                        "keep": keep, "cal_dirs": cal_dirs, "target": target, "backend": "reference",
                        "passkey": "teacher-forced, correct iff every answer token is the argmax"},
           "machine": "CPU (2 cores shared with other jobs), torch " + torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    for spec in methods:
        name, cal_dir = _parse(spec, cal_dirs)
        t1 = time.time()
        base, _, var = name.partition(":")
        tgt = float(var[1:]) if var.startswith("d") else target  # NAME:d0.06 aims at density 0.06
        key = base if var.startswith("d") else name
        cfg, aimed = build_settings([key], caps[0][0], caps[0][1], length, tgt, cal_dir, out_dir)[key]
        m = get_method(base, **cfg) if name != "dense" else None
        run_pk = spec not in coverage_only
        hits, covs, nread, nkept, kfrac = [], [], 0, 0, []
        dens: list[float] = []
        for p, (layers, scales) in zip(prompts, caps):
            pats = select_layers(m, layers, scales) if m is not None else {}
            if run_pk:
                if m is None:
                    pred = teacher_forced_predict(model, p["prompt_ids"], p["answer_ids"], "cpu")
                else:
                    with _Densities(m) as rec, warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        with patched(model, method=m, backend="reference"):
                            pred = teacher_forced_predict(model, p["prompt_ids"], p["answer_ids"], "cpu")
                    dens += rec.values
                hits.append(int(score_teacher_forced(pred, p["answer_ids"])["correct"]))
            elif m is not None:
                dens += [float(q.density) for q in pats.values()]
            nc = needle_coverage({l: t[:2] for l, t in layers.items()}, pats, p["rows"], p["needle"], scales=scales,
                                 threshold=threshold, keep=keep)
            nread += nc["n_reading"]
            nkept += nc["n_kept"]
            if nc["n_reading"]:
                kfrac.append(nc["mean_kept_fraction"])
            covs.append([(h["layer"], h["head"], int(h["kept"])) for h in nc["heads"]])
        row = {"method": spec, "length": length, "target": target, "n": n,
               "correct": sum(hits) if run_pk else None,
               "density": round(sum(dens) / len(dens), 4) if dens else 1.0, "aimed_density": round(aimed, 4),
               "density_from": "patched run" if run_pk else "dense q/k",
               "reading_heads_per_prompt": round(nread / n, 2), "needle_kept": nkept, "needle_reading": nread,
               "coverage": round(nkept / nread, 4) if nread else float("nan"),
               "mean_kept_fraction": round(sum(kfrac) / len(kfrac), 4) if kfrac else float("nan"),
               "by_depth": "".join(map(str, hits)), "config": json.dumps(_short(cfg)),
               "seconds": round(time.time() - t1, 1), "heads": covs}
        rows.append(row)
        _log(f"{spec}: {row['correct']}/{n} at density {row['density']}, needle kept {nkept}/{nread} "
             f"({row['seconds']} s)")
        _write(doc, out_dir, stem, write_csv)
    if recall_for:
        from ..methods.seer_attention import nz_topk

        name, cal_dir = _parse(recall_for, cal_dirs)
        cfg = build_settings(["seer_attention"], caps[0][0], caps[0][1], length, target, cal_dir, out_dir)
        seer = get_method("seer_attention", **cfg["seer_attention"][0])
        k_row = nz_topk(seer.nz_ratio, -(-length // BLOCK))
        rec = [gate_block_recall(seer, layers, scales, k_row) for layers, scales in caps[:3]]
        extra["gate_block_recall"] = {"gate": recall_for, "k_per_row": k_row, "prompts": len(rec),
                                      "per_layer": [round(sum(c) / len(c), 4) for c in zip(*rec)]}
        _log(f"seer gate block recall vs oracle (k={k_row}): {extra['gate_block_recall']['per_layer']}")
        _write(doc, out_dir, stem, write_csv)
    return rows


def _write(doc: dict, out_dir: Path, stem: str, write_csv) -> None:
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_csv([{k: v for k, v in r.items() if k != "heads"} for r in doc["rows"]], out_dir / f"{stem}.csv")


def plot(json_paths: Sequence[str], out_png: str) -> str:
    """plot: passkey accuracy and needle coverage per method (bars) of one or more ``check_*.json`` runs,
    one panel per run, density written on each bar -> ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [json.loads(Path(p).read_text()) for p in json_paths]
    fig, axes = plt.subplots(1, len(docs), figsize=(5.5 * len(docs), 3.8), squeeze=False)
    for ax, p, doc in zip(axes[0], json_paths, docs):
        rows = doc["rows"]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [(r["correct"] or 0) / r["n"] for r in rows], 0.4,
               label="passkey (teacher-forced; no bar: not run)")
        ax.bar([i + 0.2 for i in x], [0 if r["coverage"] != r["coverage"] else r["coverage"] for r in rows], 0.4,
               label="needle coverage")
        for i, r in zip(x, rows):
            ax.text(i, 1.03, f"{r['density']:.2f}", ha="center", fontsize=7)
        ax.set_xticks(list(x), [r["method"].replace("seer_attention", "seer") for r in rows], rotation=30, fontsize=8)
        ax.set_ylim(0, 1.12)
        ax.set_title(f"{Path(p).stem} (T={rows[0]['length']}, n={rows[0]['n']}; density above bars)", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _short(cfg: dict) -> dict:
    return {k: (Path(v).name if isinstance(v, str) and "/" in v else v) for k, v in cfg.items()}


def main(argv=None) -> int:
    """main: ``python -m sparsattn.calibrate.check``."""
    p = argparse.ArgumentParser(prog="python -m sparsattn.calibrate.check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--target", type=float, default=0.1)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cal-dirs", default="", help="label=DIR,... calibration folders for specs NAME@label "
                                                     "(label 'shipped' = the shipped folder)")
    p.add_argument("--coverage-only", default="", help="comma list of specs measured without the passkey run")
    p.add_argument("--recall-for", default=None, help="seer spec whose gate block recall vs the oracle is reported")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--tag", default="")
    p.add_argument("--plot", nargs="+", default=None, help="only plot these check_*.json files to OUT (a .png)")
    a = p.parse_args(argv)
    if a.plot:
        print(plot(a.plot, a.out))
        return 0
    torch.set_grad_enabled(False)
    cal = dict(x.split("=", 1) for x in a.cal_dirs.split(",") if x)
    run(a.out, length=a.length, n=a.n, target=a.target, methods=[m for m in a.methods.split(",") if m],
        cal_dirs=cal, coverage_only=[m for m in a.coverage_only.split(",") if m], threshold=a.threshold,
        tag=a.tag, recall_for=a.recall_for)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
