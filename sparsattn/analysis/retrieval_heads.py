"""retrieval_heads: Retrieval-head scores and the head-masking test (Retrieval Head Mechanistically
Explains Long-Context Factuality, Wu et al., arXiv 2404.15574).

Score (the paper's definition, EVAL.md section 5): at each step where the model emits a token of the
needle it is copying, a (layer, head) gains ``1 / |needle|`` when its top-1 attended position lies in
the needle span and the token there equals the token emitted. A head's score is the mean over the
(length, depth) trials; heads above 0.1 are retrieval heads.

Differences from the authors' script (``nightdessert/Retrieval_Head``, read, not copied):
- the needle is the task's answer value (the passkey's 7 digits with its leading space), not a
  whole sentence the model repeats; |needle| is that value's token count;
- instead of decoding token by token with eager attention, one forward over ``prompt + answer``
  gives the attention rows of every answer step (exactly the rows decode would compute, given the
  gold prefix) and the model's own argmax at each step is the "emitted" token;
- lengths and depths are a small grid (CPU), not 1K-50K x 11 depths.

Causal test: zero the output of the top-k heads (their slice of ``o_proj``'s input) vs k random
heads (several draws) and count exactly-correct passkey answers (teacher-forced, every answer token
the argmax).
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

from ._common import Report, accuracy_bars, attention_layers, attention_rows, exact_count, heads_to_edits, progress, task_prompts

THRESHOLD = 0.1


def _find(seq: list, sub: list) -> int:
    """Start of the last occurrence of ``sub`` in ``seq`` (-1 if absent)."""
    n = len(sub)
    for s in range(len(seq) - n, -1, -1):
        if seq[s:s + n] == sub:
            return s
    return -1


def score_sample(model, prompt_ids: list, answer_ids: list, device: str = "cpu") -> tuple[torch.Tensor, dict]:
    """score_sample: retrieval scores ``[layers, heads]`` (float64) of one copy-paste trial.

    The needle span is the answer's token sequence as it occurs in the prompt (its last occurrence).
    Returns the scores and ``{"needle_start", "needle_len", "copied"}`` (answer steps whose emitted
    token equals the gold one).
    Raises:
        ValueError: the answer tokens do not occur in the prompt (nothing to copy).
    """
    from ..capture import capture_qkv

    start = _find(list(prompt_ids), list(answer_ids))
    if start < 0:
        raise ValueError("answer_ids: the answer's tokens do not occur in the prompt; a retrieval score needs a "
                         "needle the model copies")
    mods = attention_layers(model)
    P, n = len(prompt_ids), len(answer_ids)
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=device)
    got = {}
    h = model.register_forward_hook(lambda m, a, out: got.__setitem__("logits", out.logits[0, P - 1:P - 1 + n].argmax(-1)))
    try:
        cap = capture_qkv(model, ids)
    finally:
        h.remove()
    emitted = got["logits"].cpu()
    rows = list(range(P - 1, P - 1 + n))
    layers = sorted(mods)
    prompt = torch.tensor(list(prompt_ids))
    out = torch.zeros(len(layers), cap[layers[0]][0].shape[1], dtype=torch.float64)
    for a, l in enumerate(layers):
        q, k, _ = cap[l]
        p = attention_rows(q, k, float(mods[l].scaling), rows)[0]  # [H, n, T]
        top = p.argmax(-1).cpu()  # [H, n]
        inside = (top >= start) & (top < start + n)
        same = prompt[top.clamp(max=P - 1)] == emitted[None, :]
        out[a] = (inside & same & (top < P)).double().sum(-1) / n
    return out, {"needle_start": start, "needle_len": n,
                 "copied": int((emitted == torch.tensor(list(answer_ids))).sum())}


def retrieval_scores(model, tok, lengths: Sequence[int] = (512, 1024, 2048), n_depths: int = 5, *, seed: int = 0,
                     task: str = "passkey", device: str = "cpu", show_progress: bool = True) -> tuple[torch.Tensor, list]:
    """retrieval_scores: mean retrieval score ``[layers, heads]`` over ``lengths`` x ``n_depths`` needle
    depths (``linspace(0, 1, n_depths)``) of ``task``, and one row per trial."""
    trials, rows = [], []
    jobs = [(L, s) for L in lengths for s in task_prompts(tok, task, L, n_depths, seed)]
    for L, s in progress(jobs, "retrieval scores", show_progress):
        sc, info = score_sample(model, s.prompt_ids, s.answer_ids, device)
        trials.append(sc)
        rows.append({"length": L, "depth": round(s.depth, 3), "needle_start": info["needle_start"],
                     "needle_len": info["needle_len"], "copied": info["copied"],
                     "heads_over_threshold": int((sc > THRESHOLD).sum())})
    return torch.stack(trials).mean(0), rows


def ranked_heads(scores: torch.Tensor) -> list:
    """ranked_heads: ``[(layer, head, score)]`` sorted by score, highest first (ties: lower layer, head)."""
    L, H = scores.shape
    items = [(l, h, float(scores[l, h])) for l in range(L) for h in range(H)]
    return sorted(items, key=lambda x: (-x[2], x[0], x[1]))


def masking_test(model, samples: list, top: list, *, k: int, n_random: int = 3, seed: int = 0,
                 device: str = "cpu", show_progress: bool = True) -> list:
    """masking_test: exact passkey counts with no head masked, the top-``k`` heads of ``top`` masked, and
    ``n_random`` draws of ``k`` random heads (not among the top k) masked -> rows."""
    L_H = [(l, h) for l, h, _ in top]
    topk = L_H[:k]
    rng = random.Random(seed)
    others = L_H[k:]
    settings = [("none", [])] + [(f"top{k}", topk)]
    settings += [(f"random{k}#{i}", rng.sample(others, min(k, len(others)))) for i in range(n_random)]
    rows = []
    for name, heads in progress(settings, "masking test", show_progress):
        c, n, hits = exact_count(model, samples, heads_to_edits(heads) if heads else None, device)
        rows.append({"masked": name, "k": len(heads), "correct": c, "n": n, "accuracy": round(100.0 * c / n, 1),
                     "heads": " ".join(f"L{l}H{h}" for l, h in heads), "per_sample": "".join(map(str, hits))})
    return rows


def analyze(model, tok, *, lengths: Sequence[int] = (512, 1024, 2048), n_depths: int = 5, k: Optional[int] = None,
            test_length: int = 1024, n_test: int = 10, n_random: int = 3, seed: int = 0, device: str = "cpu",
            show_progress: bool = True) -> Report:
    """analyze: retrieval scores (heat map), the ranked heads and the masking test -> ``Report``.

    ``k`` (heads masked) defaults to the number of heads scoring above 0.1 (at least 1)."""
    scores, trials = retrieval_scores(model, tok, lengths, n_depths, seed=seed, device=device,
                                      show_progress=show_progress)
    top = ranked_heads(scores)
    n_ret = sum(1 for *_, s in top if s > THRESHOLD)
    k = max(1, n_ret) if k is None else k
    samples = task_prompts(tok, "passkey", test_length, n_test, seed + 1)
    mask_rows = masking_test(model, samples, top, k=k, n_random=n_random, seed=seed, device=device,
                             show_progress=show_progress)
    rows = [{"rank": i + 1, "layer": l, "head": h, "score": round(s, 4), "retrieval_head": s > THRESHOLD}
            for i, (l, h, s) in enumerate(top)]
    summary = {"scores": scores, "threshold": THRESHOLD, "n_heads": scores.numel(), "n_retrieval_heads": n_ret,
               "retrieval_heads": [[l, h] for l, h, s in top if s > THRESHOLD], "lengths": list(lengths),
               "n_depths": n_depths, "trials": trials, "masking": mask_rows, "k": k, "test_length": test_length}

    def plot(path):
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        im = a.imshow(scores.numpy(), cmap="viridis", vmin=0, aspect="auto")
        a.set_xlabel("head")
        a.set_ylabel("layer")
        a.set_title(f"retrieval score ({len(trials)} trials; > {THRESHOLD}: {n_ret} heads)", fontsize=9)
        fig.colorbar(im, ax=a)
        accuracy_bars(b, mask_rows, [r["masked"] for r in mask_rows], ["grey", "C3"] + ["C0"] * n_random)
        b.set_title(f"masking heads, passkey @ {test_length}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    rep = Report("retrieval_heads", rows, summary, ["rank", "layer", "head", "score", "retrieval_head"],
                 f"retrieval heads (top of {scores.numel()}; threshold {THRESHOLD})", plot,
                 extra_csv={"masking": mask_rows, "trials": trials})
    return rep
