"""Card: the model card (README.md) of a trained checkpoint, rendered from its metrics JSON.

``metrics.json`` (written by ``sparsattn.train.lm``) holds ``recipe``, ``training``,
``environment``, ``selfcheck`` and ``eval``. The evaluation step fills ``eval`` afterwards, e.g.::

    {"perplexity": {"2048": 3.1, "8192": 2.9, "16384": 2.8},
     "passkey": {"2048": {"0.0": 1.0, "0.5": 0.95, "1.0": 1.0}, "16384": {...}},
     "dataset": "held-out source files", "date": "2026-11-29", "notes": "..."}

``perplexity``: length -> held-out perplexity; ``passkey``: length -> depth -> accuracy in
[0, 1] (or length -> accuracy). Any other key is rendered as a nested list.

An optional ``eval_cpu`` section holds a dense evaluation measured on the CPU, with sample counts::

    {"device": "CPU (2 cores)", "date": "...", "torch": "...", "transformers": "...",
     "perplexity": {"2048": {"ppl": 5.9, "nll": 1.78, "n_tokens": 8188, "n_windows": 4}, ...},
     "passkey": {"noise": {"2048": {"0.0": {"acc": 1.0, "n": 2}, ...}, ...}, "code": {...}}, ...}

It is rendered as tables (perplexity with tokens scored; pass-key accuracy by length x depth per
haystack, with the number of samples per cell); its other keys as a nested list.

Update a card: ``python -m sparsattn.train.card CHECKPOINT_DIR --eval eval.json``
(merges eval.json into ``metrics.json["eval"]`` and rewrites README.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

GOAL_PASSKEY = 0.95


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _kv_table(d: dict, key: str = "setting", value: str = "value") -> list[str]:
    lines = [f"| {key} | {value} |", "| --- | --- |"]
    for k, v in d.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True)
        lines.append(f"| {k} | {_fmt(v)} |")
    return lines


def _nested(d, indent: int = 0) -> list[str]:
    out = []
    pad = "  " * indent
    if isinstance(d, dict):
        for k, v in d.items():
            if isinstance(v, (dict, list)):
                out.append(f"{pad}- {k}:")
                out += _nested(v, indent + 1)
            else:
                out.append(f"{pad}- {k}: {_fmt(v)}")
    elif isinstance(d, list):
        for v in d:
            out += _nested(v, indent) if isinstance(v, (dict, list)) else [f"{pad}- {_fmt(v)}"]
    else:
        out.append(f"{pad}- {_fmt(d)}")
    return out


def _sort_num(keys):
    def k(x):
        try:
            return (0, float(x))
        except (TypeError, ValueError):
            return (1, str(x))
    return sorted(keys, key=k)


def _passkey_table(pk: dict) -> list[str]:
    lengths = _sort_num(pk)
    if all(isinstance(pk[L], dict) for L in lengths):
        depths = _sort_num({d for L in lengths for d in pk[L]})
        lines = ["| length \\ depth | " + " | ".join(str(d) for d in depths) + " | mean |",
                 "| --- " * (len(depths) + 2) + "|"]
        for L in lengths:
            row = [pk[L].get(d) for d in depths]
            vals = [v for v in row if isinstance(v, (int, float))]
            mean = sum(vals) / len(vals) if vals else None
            lines.append(f"| {L} | " + " | ".join("" if v is None else f"{100 * v:.0f}%" for v in row)
                         + f" | {'' if mean is None else f'{100 * mean:.1f}%'} |")
        return lines
    lines = ["| length | accuracy |", "| --- | --- |"]
    lines += [f"| {L} | {100 * pk[L]:.1f}% |" for L in lengths if isinstance(pk[L], (int, float))]
    return lines


def _eval_cpu_section(ec: dict) -> list[str]:
    """Markdown of ``metrics["eval_cpu"]`` (see the module docstring)."""
    L = [f"### Dense evaluation on {ec.get('device', 'CPU')}\n"]
    ppl = ec.get("perplexity")
    if isinstance(ppl, dict) and ppl:
        L.append("Held-out perplexity (dense attention) by context length:\n")
        L += ["| context | perplexity | mean NLL (nats) | tokens scored | windows |", "| --- | --- | --- | --- | --- |"]
        for k in _sort_num(ppl):
            v = ppl[k]
            if isinstance(v, dict):
                L.append(f"| {k} | {_fmt(v.get('ppl', ''))} | {_fmt(v.get('nll', ''))} | "
                         f"{_fmt(v.get('n_tokens', ''))} | {_fmt(v.get('n_windows', ''))} |")
            else:
                L.append(f"| {k} | {_fmt(v)} | | | |")
        L.append("")
    pk = ec.get("passkey")
    if isinstance(pk, dict) and pk:
        for hay in pk:
            tab = pk[hay]
            if not isinstance(tab, dict) or not tab:
                continue
            lengths = _sort_num(tab)
            depths = _sort_num({d for n in lengths if isinstance(tab[n], dict) for d in tab[n]})
            L.append(f"Dense pass-key accuracy, {hay} haystack (accuracy, samples per cell):\n")
            L += ["| length \\ depth | " + " | ".join(str(d) for d in depths) + " | all |",
                  "| --- " * (len(depths) + 2) + "|"]
            for n in lengths:
                row, hits, count = [], 0.0, 0
                for d in depths:
                    c = tab[n].get(d) if isinstance(tab[n], dict) else None
                    if isinstance(c, dict) and isinstance(c.get("acc"), (int, float)) and isinstance(c.get("n"), int):
                        row.append(f"{100 * c['acc']:.0f}% ({c['n']})")
                        hits += c["acc"] * c["n"]
                        count += c["n"]
                    else:
                        row.append("")
                total = f"{100 * hits / count:.1f}% ({count})" if count else ""
                L.append(f"| {n} | " + " | ".join(row) + f" | {total} |")
            L.append("")
    rest = {k: v for k, v in ec.items() if k not in ("perplexity", "passkey", "device")}
    if rest:
        L += _nested(rest)
        L.append("")
    return L


def render_card(metrics: dict) -> str:
    """render_card: Markdown model card from a metrics dict (see the module docstring for the schema).

    Raises:
        ValueError: ``metrics`` is not a dict.
    """
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics: expected a dict, got {type(metrics).__name__}")
    recipe = metrics.get("recipe", {})
    training = metrics.get("training", {})
    env = metrics.get("environment", {})
    selfcheck = metrics.get("selfcheck", {})
    ev = metrics.get("eval") or {}
    model = recipe.get("model", {})
    L = []
    L.append("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [llama, long-context, "
             "sparsattn]\n---\n")
    L.append("# sparsattn bundled long-context model\n")
    n_params = model.get("n_params")
    L.append("A small Llama-architecture decoder (GQA, RoPE) trained from scratch by `sparsattn.train.lm` "
             "on the Python source files of a local installation mixed with synthetic retrieval tasks "
             "(pass keys, multi-key needles, variable tracking, key-value lists), so that it has genuine "
             "retrieval heads at long context. It exists to test and measure sparse attention methods "
             "offline; it is not a general-purpose language model."
             + (f" Parameters: {n_params:,} (embeddings included, tied)." if isinstance(n_params, int) else "")
             + "\n")
    L.append("## Use\n")
    L.append("```python\nfrom sparsattn.models import load_bundled\nmodel, tokenizer = load_bundled(device=\"cuda\")\n"
             "# or: AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)\n```\n")
    L.append("## Evaluation\n")
    ec = metrics.get("eval_cpu")
    if not ev and not (isinstance(ec, dict) and ec):
        L.append("_Not evaluated yet: run the evaluation step and "
                 "`python -m sparsattn.train.card <checkpoint> --eval eval.json`._\n")
    elif ev:
        ppl = ev.get("perplexity")
        if isinstance(ppl, dict) and ppl:
            L.append("Held-out perplexity (dense attention) by context length:\n")
            L += ["| context | perplexity |", "| --- | --- |"]
            L += [f"| {k} | {_fmt(ppl[k])} |" for k in _sort_num(ppl)]
            L.append("")
        pk = ev.get("passkey")
        if isinstance(pk, dict) and pk:
            L.append(f"Dense pass-key accuracy (goal: >= {100 * GOAL_PASSKEY:.0f}% up to the trained length):\n")
            L += _passkey_table(pk)
            L.append("")
        rest = {k: v for k, v in ev.items() if k not in ("perplexity", "passkey")}
        if rest:
            L += _nested(rest)
            L.append("")
    if isinstance(ec, dict) and ec:
        L += _eval_cpu_section(ec)
    if selfcheck:
        where = env.get("gpu") or env.get("device")
        L.append("### Training-time self-check\n")
        L.append("Measured by the training script right after training"
                 + (f", on the training device ({where})" if where else "")
                 + " (greedy decode, string match; a quick check, not the evaluation above):\n")
        pk = selfcheck.get("passkey")
        if isinstance(pk, dict) and pk:
            L += _passkey_table({k: (v.get("by_depth") if isinstance(v, dict) and "by_depth" in v else
                                     v.get("acc") if isinstance(v, dict) else v) for k, v in pk.items()})
            L.append("")
        rest = {k: v for k, v in selfcheck.items() if k != "passkey"}
        if rest:
            L += _nested(rest)
            L.append("")
    L.append("## Training\n")
    keys = [("steps", "optimizer steps"), ("tokens_seen", "tokens seen"), ("train_seconds", "training time (s)"),
            ("total_seconds", "whole run incl. data prep (s)"), ("final_lm_loss", "final LM loss (code)"),
            ("final_answer_loss", "final retrieval-answer loss"), ("final_answer_acc", "final answer token accuracy"),
            ("stopped_early", "stopped early")]
    rows = {label: training[k] for k, label in keys if k in training}
    if rows:
        L += _kv_table(rows, "quantity", "value")
        L.append("")
    phases = training.get("phases")
    if phases:
        L.append("Curriculum as run:\n")
        L += ["| seq len | steps | tokens | seconds | tokens/s | last LM loss | last answer loss |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for p in phases:
            L.append(f"| {p.get('seq_len')} | {p.get('steps')} | {p.get('tokens')} | {_fmt(p.get('seconds'))} | "
                     f"{_fmt(p.get('tokens_per_s'))} | {_fmt(p.get('lm_loss'))} | {_fmt(p.get('answer_loss'))} |")
        L.append("")
    L.append("## Recipe\n")
    if model:
        L.append("Model:\n")
        L += _kv_table(model)
        L.append("")
    other = {k: v for k, v in recipe.items() if k != "model"}
    if other:
        L.append("Training settings and data:\n")
        L += _kv_table(other)
        L.append("")
    if env:
        L.append("## Environment\n")
        L += _kv_table(env)
        L.append("")
    L.append("## Limitations\n")
    L.append("Trained for minutes on code and synthetic tasks only: it knows Python source text and the "
             "retrieval formats it was trained on; beyond the trained length (see max_position_embeddings) "
             "nothing is promised.\n")
    return "\n".join(L).rstrip() + "\n"


def write_card(folder, metrics: dict | None = None, eval_metrics: dict | None = None) -> Path:
    """write_card: (re)write ``folder/README.md`` and ``folder/metrics.json``.

    Args:
        folder: checkpoint folder.
        metrics: the full metrics dict; default: read ``folder/metrics.json``.
        eval_metrics: merged into ``metrics["eval"]`` (keys replace existing ones).
    Returns:
        Path of README.md.
    Raises:
        ValueError: no metrics given and no metrics.json in the folder.
    """
    folder = Path(folder)
    mpath = folder / "metrics.json"
    if metrics is None:
        if not mpath.is_file():
            raise ValueError(f"folder: expected {mpath} (written by sparsattn.train.lm)")
        metrics = json.loads(mpath.read_text())
    if eval_metrics:
        if not isinstance(eval_metrics, dict):
            raise ValueError(f"eval_metrics: expected a dict, got {type(eval_metrics).__name__}")
        metrics.setdefault("eval", {})
        metrics["eval"] = {**(metrics.get("eval") or {}), **eval_metrics}
    folder.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    out = folder / "README.md"
    out.write_text(render_card(metrics))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsattn.train.card", description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="checkpoint folder with metrics.json")
    ap.add_argument("--eval", dest="eval_json", help="JSON file of evaluation metrics to merge into the card")
    args = ap.parse_args(argv)
    ev = json.loads(Path(args.eval_json).read_text()) if args.eval_json else None
    print(write_card(args.folder, eval_metrics=ev))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
